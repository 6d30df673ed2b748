"""Google's Batch Mode: the REST calls (api.py), the request and results files (files.py), the backend that submits (backend.py) and collects (collect.py), and `runner cancel` (cancel.py)."""

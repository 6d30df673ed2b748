"""How one request is made and read: the HTTP seam, the request formats, answers, time limits."""

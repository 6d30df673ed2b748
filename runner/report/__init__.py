"""After a run: the summary of an output dir (counts, failures, cost) and its HTML gallery."""

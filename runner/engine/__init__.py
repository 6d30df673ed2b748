"""One run from start to end: plan against the output dir, hand the items to a backend, record, summarise."""

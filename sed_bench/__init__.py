"""sed-bench: latency of SED backends per stage and per top-k."""

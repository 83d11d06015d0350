"""Access traces: the format, the recorder and merge (format), and the sandbox that runs a
workload to record one (sandbox)."""

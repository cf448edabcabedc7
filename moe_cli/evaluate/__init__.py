"""`moe eval` and `moe inspect` as a library: the task's quality metrics, routing statistics, FLOPs and
throughput (:mod:`.report`); where tokens go, as figures and routes.json (:mod:`.inspect`)."""

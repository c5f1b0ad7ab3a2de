"""Side-by-side benchmarks of AdaptiveLLM against stock vLLM (`python -m adaptivellm.benchmark`).

Talks to servers over HTTP only: importing this package never imports vLLM or torch.

- `workloads`: seeded workloads (arrivals, ShareGPT-shaped lengths, tenants) and scenarios;
- `client`: replays a workload through the real `openai` client (streaming) and times it;
- `metrics`: throughput, latency percentiles, weighted turnaround, Jain's index, counters;
- `harness`: starts the servers, calibrates service times, takes turns replaying;
- `report` / `plots`: the JSON report, Markdown tables and PNG plots; `cli`: the command.
"""

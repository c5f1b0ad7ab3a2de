"""Scale-out: one OpenAI-compatible endpoint over N AdaptiveLLM replicas (`adaptivellm serve
--replicas N`).

- `router.py`: the routing decision (pure functions over each replica's published load).
- `ledger.py`: the global tenant ledger (VTC counters across replicas) and the router's
  per-tenant admission queue.
- `actors.py`: the Ray side: one actor per replica, each owning a full `adaptivellm serve`
  subprocess (through `reaper.py`, so that no engine process outlives its replica).
- `proxy.py`: the router's asyncio HTTP server (aiohttp): proxying, retries, streams, split
  WebSocket sessions, `/metrics`.
- `main.py`: the command line (`adaptivellm serve --replicas N ...`).

See docs/scaleout.md.
"""

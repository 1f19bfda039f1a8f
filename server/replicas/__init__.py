"""kvmux scaled out on Ray Serve: N replicas, each a whole kvmux server, behind one OpenAI endpoint.

- `affinity`: the cache-affinity key of a request (X-Session-Id, else the prompt's first block);
- `router`: Serve's request router for the replicas (consistent hashing on the key, else load);
- `forwarding`: a request carried from the entry to a replica and run through kvmux's app there;
- `replica`: the replica deployment (model, engine, scheduler, kvmux's FastAPI app);
- `ingress`: the light HTTP entry that reads requests, keys them and hands them to Serve;
- `metrics_merge`: one Prometheus exposition from every replica's;
- `deploy`: the Serve application from kvmux's config (`app_builder` for `serve run` and KubeRay);
- `launch`: `kvmux serve --replicas N [--ray-address ADDR]`.

Only `affinity`, `forwarding` and `metrics_merge` import without Ray (`pip install 'kvmux[ray]'`).
See docs/scale_out.md.
"""

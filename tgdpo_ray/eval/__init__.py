"""MT-Bench-style evaluation: vLLM engines on the cluster answer the questions, an LLM judge grades the answers,
and the statistics and the report come out in one eval folder. It reads trained models from disk and shares
nothing with training but the configuration and the cluster plumbing (tgdpo_ray/runtime/)."""

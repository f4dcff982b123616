"""Loads a saved policy in vLLM and prints the generated token ids as JSON (run as a script: vLLM starts
worker processes, so it needs the __main__ guard and a process of its own)."""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    model_dir, prompt = sys.argv[1], sys.argv[2]
    # On the CPU backend this fraction is of host memory; vLLM's default (0.92) fails on a shared machine.
    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1)
    output = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0]
    print("RESULT " + json.dumps({"token_ids": list(output.token_ids), "text": output.text}))

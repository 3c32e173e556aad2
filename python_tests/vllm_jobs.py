"""Runs vLLM generations for test_vllm.py in a process of their own (vLLM starts worker processes
and keeps global state). Reads a JSON list of jobs, writes a JSON list of results:

    python vllm_jobs.py jobs.json results.json

A job is {"model": folder, "requests": [{"prompt": [ids], "params": {SamplingParams kwargs}}],
"refused": [{SamplingParams kwargs}, ...]}; all of a job's requests go to one engine in one
generate call (one continuous batch), then each "refused" one alone. A result holds each request's
token ids and logprobs (when asked for), and the error each "refused" request raised.
"""
import json
import sys

ENGINE = dict(skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              gpu_memory_utilization=0.1, max_model_len=256, seed=0)


def main(jobs_path, results_path):
    from vllm import LLM, SamplingParams
    results = []
    for job in json.load(open(jobs_path)):
        llm = LLM(job["model"], **ENGINE, **job.get("engine", {}))
        prompts = [{"prompt_token_ids": r["prompt"]} for r in job["requests"]]
        params = [SamplingParams(**r["params"]) for r in job["requests"]]
        outputs = llm.generate(prompts, params, use_tqdm=False)
        result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
                  "logprobs": [[{str(t): p.logprob for t, p in step.items()}
                                for step in (o.outputs[0].logprobs or [])] for o in outputs],
                  "errors": []}
        for bad in job.get("refused", []):
            try:
                llm.generate(prompts[:1], SamplingParams(**bad), use_tqdm=False)
                result["errors"].append(None)
            except Exception as error:  # what the caller sees, whatever its type
                result["errors"].append(f"{type(error).__name__}: {error}")
        results.append(result)
        llm.llm_engine.engine_core.shutdown()
        del llm
    json.dump(results, open(results_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])

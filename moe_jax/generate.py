"""`python -m moe_jax.generate`: generate for one prompt or a JSONL file of prompts.

    python -m moe_jax.generate --prompt "Once upon a time"                  # default: tiny-mixtral
    python -m moe_jax.generate --model DIR --input in.jsonl --output out.jsonl [--resume]

Bad input (model, flags, prompts, JSONL lines) is reported on stderr in one line each, exit code 2,
before the model's weights are loaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from moe_jax.checkpoint import CheckpointError
from moe_jax.config import ConfigError
from moe_jax.hrm import HardwareError, InfeasibleError
from moe_jax.jsonl_jobs import CompletionWriter, JobInputError, output_record, read_job
from moe_jax.llm import DTYPES, LLM, POLICIES, PolicyUnavailable
from moe_jax.model_source import ModelNotFound, open_model
from moe_jax.offload_policy import PolicyError
from moe_jax.presets import DEFAULT_PRESET
from moe_jax.progress import Progress
from moe_jax.prompts import PromptError, encode_prompt
from moe_jax.sampling import SamplingParams

USER_ERRORS = (ConfigError, CheckpointError, ModelNotFound, PolicyUnavailable, PolicyError, JobInputError,
               PromptError, HardwareError, InfeasibleError, MemoryError)
log = logging.getLogger("moe_jax")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_jax.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_PRESET, help=f"checkpoint directory or preset (default {DEFAULT_PRESET})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt; the completion goes to stdout")
    src.add_argument("--input", type=Path, help="JSONL file of requests")
    p.add_argument("--output", type=Path, help="JSONL file of completions (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(set(DTYPES.values())), default="bfloat16")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--max-batch-size", type=int, default=64, help="resident policy: sequences per wave")
    p.add_argument("--gpu-memory-gb", type=float, help="GPU memory the engine may use, GiB (offload/auto)")
    p.add_argument("--hardware", help="HRM hardware profile name or JSON file (default: detected)")
    p.add_argument("--resume", action="store_true", help="keep the finished lines of --output and run the rest")
    args = p.parse_args(argv)
    if args.resume and not args.output:
        p.error("--resume needs --output")
    return args


def finished_ids(path: Path) -> set:
    """ids of the complete lines of an earlier output; a torn last line (a crash mid-write) is cut off."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    keep = data[:data.rfind(b"\n") + 1]
    ids = set()
    for n, line in enumerate(keep.decode("utf-8").splitlines(), 1):
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise JobInputError(f"{path}:{n}: not a completion line; cannot resume into this file") from None
    if len(keep) < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - len(keep))
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return ids


def run(args: argparse.Namespace) -> int:
    base = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
    jobs = read_job(args.input) if args.input else None
    source = open_model(args.model, seed=0)  # config and tokenizer only; weights load in LLM
    if jobs is None:
        prompts, params, ids = [encode_prompt(source.cfg, source.tokenizer, args.prompt, "--prompt")], [base], [0]
    else:
        errors, prompts = [], []
        for j in jobs:
            try:
                prompts.append(encode_prompt(source.cfg, source.tokenizer, j.prompt, f"{args.input}:{j.line}: prompt"))
            except PromptError as e:
                errors.append(str(e))
        if errors:
            raise JobInputError("\n".join(errors))
        done = finished_ids(args.output) if args.resume else set()
        keep = [i for i, j in enumerate(jobs) if j.id not in done]
        if done:
            log.info("resuming: %d of %d requests already in %s", len(jobs) - len(keep), len(jobs), args.output)
        prompts = [prompts[i] for i in keep]
        params = [base.replace(max_new_tokens=jobs[i].max_new_tokens or base.max_new_tokens) for i in keep]
        ids = [jobs[i].id for i in keep]
        if args.output and not args.resume and args.output.exists():
            args.output.unlink()
    llm = LLM(source, dtype=args.dtype, policy=args.policy, max_batch_size=args.max_batch_size,
              gpu_memory_gb=args.gpu_memory_gb, hardware=args.hardware)
    writer = CompletionWriter(args.output) if args.output else None
    progress = Progress(total=len(prompts))
    start, generated = time.perf_counter(), 0
    try:
        for i, c in llm.generate_iter(prompts, params):
            generated += len(c.token_ids)
            if args.prompt is not None:
                print(c.text if c.text is not None else json.dumps(c.token_ids))
            else:
                record = output_record(ids[i], c.token_ids, c.text, c.finish_reason)
                if writer:
                    writer.write(record)
                    writer.flush()
                else:
                    print(json.dumps(record, ensure_ascii=False), flush=True)
            progress.update(1, len(c.token_ids))
    finally:
        progress.close()
        if writer:
            writer.close()
    wall = time.perf_counter() - start
    if llm.stats is not None:
        print(llm.stats.summary(), file=sys.stderr)
    print(f"done: {len(prompts)} prompts, {generated} generated tokens, {wall:.2f} s, "
          f"{generated / max(wall, 1e-9):.1f} tok/s (model {llm.name}, policy {llm.policy}, {args.dtype})",
          file=sys.stderr)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("moe_jax", "pallas_kernels", "host_ops"):
        logging.getLogger(name).setLevel(logging.INFO)
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

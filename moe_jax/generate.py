"""`python -m moe_jax.generate`: generate for one prompt or a JSONL file of prompts.

    python -m moe_jax.generate --prompt "Once upon a time"                  # default: tiny-mixtral
    python -m moe_jax.generate --model DIR --input in.jsonl --output out.jsonl [--resume | --overwrite] [--skip-invalid]

Input lines are plain ({"prompt"} or {"prompt_token_ids"}, optional "id", "max_new_tokens") or OpenAI
batch requests (/v1/completions, /v1/chat/completions), whose output lines mirror OpenAI's.
Bad input (model, flags, prompts, JSONL lines) is reported on stderr in one line each, exit code 2,
before the model's weights are loaded; --skip-invalid writes bad lines to OUT.errors.jsonl instead.
SIGINT/SIGTERM keep what has finished and print the command that resumes (exit code 130/143).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shlex
import sys
import time
import zlib
from pathlib import Path

from moe_jax.chat_template import ChatTemplate, ChatTemplateError, missing_template
from moe_jax.checkpoint import CheckpointError
from moe_jax.config import ConfigError
from moe_jax.expert_codec import check as check_codec
from moe_jax.hrm import HardwareError, InfeasibleError
from moe_jax.job_output import (SIDECARS, CompletionWriter, OutputError, ResumeError, check_finished, check_meta,
                                finished_ids, output_lock, record_requests, recorded_setting, sidecar, start_output,
                                write_errors)
from moe_jax.job_requests import BadLine, JobRequest
from moe_jax.jsonl_jobs import OPENAI, PLAIN, Job, JobFormat, JobInputError, read_job
from moe_jax.llm import LLM, POLICIES, PolicyUnavailable
from moe_jax.model_source import ModelNotFound, ModelSource, open_model
from moe_jax.offload_policy import CODECS, KV_CACHE_DTYPES, PolicyError
from moe_jax.params import DTYPES
from moe_jax.presets import DEFAULT_PRESET
from moe_jax.progress import Progress
from moe_jax.prompts import PromptError, encode_prompt
from moe_jax.sampling import MAX_TOP_LOGPROBS, SamplingParams
from moe_jax.saved_model import SavedModelError
from moe_jax.stop_signals import SIGNALS, Interrupted, interruptible
from moe_jax.tokenizer import TokenizerError

USER_ERRORS = (ConfigError, CheckpointError, ModelNotFound, PolicyUnavailable, PolicyError, JobInputError,
               ResumeError, OutputError, ChatTemplateError, PromptError, HardwareError, InfeasibleError, MemoryError,
               SavedModelError, TokenizerError)
MAX_REPORTED = 50  # bad input lines listed on stderr; --skip-invalid writes them all
log = logging.getLogger("moe_jax")

Ready = list[tuple[JobRequest, tuple[int, ...]]]  # requests with their prompts' token ids


def parse_args(argv=None) -> argparse.Namespace:
    # no abbreviated flags: the command printed to resume a run must read its flags as they were given
    p = argparse.ArgumentParser(prog="python -m moe_jax.generate", description=__doc__.split("\n")[0],
                                allow_abbrev=False)
    p.add_argument("--model", default=DEFAULT_PRESET, help=f"checkpoint directory or preset (default {DEFAULT_PRESET})")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one text prompt; the completion goes to stdout")
    src.add_argument("--input", type=Path, help="JSONL file of requests")
    p.add_argument("--output", type=Path, help="JSONL file of completions (default: stdout)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float,
                   help="default: 0 (greedy), or 1 for an OpenAI batch file (OpenAI's default); a line's own replaces it")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logprobs", type=int, metavar="N",
                   help="return each generated token's log-probability and the N (0..20) most likely tokens at "
                        "each position (output fields logprobs, top_logprobs; with --prompt, a JSON line)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop string (repeatable); an input line's own \"stop\" replaces these")
    p.add_argument("--dtype", choices=sorted(set(DTYPES.values())), default="bfloat16")
    p.add_argument("--policy", choices=POLICIES, default="auto")
    p.add_argument("--max-batch-size", type=int,
                   help="sequences decoding at once (default: 64 resident; HRM's choice, capped by this, offload)")
    p.add_argument("--gpu-memory-gb", type=float, help="GPU memory the engine may use, GiB (offload/auto)")
    p.add_argument("--hardware", help="HRM hardware profile name or JSON file (default: detected)")
    p.add_argument("--expert-codec", choices=CODECS, default="none",
                   help="offload: stream the experts as they are, or coded losslessly in 12 bits (exp4, bfloat16)")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                   help="offload: the host KV cache in the model's dtype, or int8 (lossy: about half the bytes, "
                        "so about twice the sequences per GiB of host memory)")
    p.add_argument("--resume", action="store_true", help="keep the finished lines of --output and run the rest")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --output (without --resume or this, such an output is refused)")
    p.add_argument("--skip-invalid", action="store_true",
                   help="write invalid input lines to OUT.errors.jsonl (with the reason) and run the rest")
    args = p.parse_args(argv)
    try:
        check_codec(args.expert_codec, args.dtype)
    except ValueError as e:
        p.error(f"--expert-codec: {e}")
    for flag in ("resume", "skip_invalid"):
        if getattr(args, flag) and not (args.input and args.output):
            p.error(f"--{flag.replace('_', '-')} needs --input and --output")
    if args.prompt is not None and args.output:
        p.error("--output takes the completions of an --input file; --prompt's completion goes to stdout")
    if args.output and not args.output.resolve().parent.is_dir():
        p.error(f"--output {args.output}: directory {args.output.resolve().parent} does not exist")
    if args.output and args.output.exists() and not args.output.is_file():
        p.error(f"--output {args.output} is a directory (or another non-file): give a file path")
    if args.output and args.input and args.output.resolve() == args.input.resolve():
        p.error("--output must not be the --input file")
    clash = next((s for s in SIDECARS if args.output and sidecar(args.output, s) == args.output), None)
    if clash:
        p.error(f"--output {args.output} is the name of its own {clash} sidecar file: give another name")
    if args.resume and args.overwrite:
        p.error("--resume keeps --output's finished lines, --overwrite replaces them: give one")
    if args.output and args.output.is_file() and args.output.stat().st_size and not (args.resume or args.overwrite):
        p.error(f"--output {args.output} already holds finished lines: --resume to continue that job, --overwrite "
                "to replace them, or another file")
    if args.logprobs is not None and not 0 <= args.logprobs <= MAX_TOP_LOGPROBS:
        p.error(f"--logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {args.logprobs}")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        p.error(f"--max-batch-size must be a positive integer, got {args.max_batch_size}")
    if args.gpu_memory_gb is not None and not 0 < args.gpu_memory_gb < math.inf:
        p.error(f"--gpu-memory-gb must be a positive number of GiB, got {args.gpu_memory_gb}")
    return args


def default_temperature(args: argparse.Namespace, fmt: JobFormat) -> None:
    """Sets --temperature, where not given, to the one a resumed output was started with, else to the input
    format's default (said, for OpenAI batch files: before 2026-11-27 they defaulted to 0, as plain lines)."""
    if args.temperature is None and args.resume and args.output is not None and args.output.exists():
        started = recorded_setting(args.output, "temperature")
        if started is not None:
            args.temperature = started
            log.info("resuming with the temperature %s was started with, %g", args.output, started)
    if args.temperature is None:
        args.temperature = fmt.default_temperature
        if fmt is OPENAI:
            log.info("requests without a 'temperature' sample at %g, OpenAI's default (--temperature sets another)",
                     args.temperature)


def base_params(args: argparse.Namespace, source: ModelSource) -> SamplingParams:
    """The CLI's sampling flags; input lines may override some per request."""
    if args.stop and source.tokenizer is None:
        raise JobInputError(f"--stop needs a model with tokenizer.json; {args.model} has none")
    try:
        return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), logprobs=args.logprobs)
    except ValueError as e:  # SamplingParams names its field first: name the flag that set it instead
        field, _, why = str(e).partition(" ")
        raise JobInputError(f"bad sampling flag: --{field.replace('_', '-')} {why}") from None


def request_seed(seed: int, request_id) -> int:
    """A request's own seed when its line sets none: --seed mixed with its id, so duplicate prompts sample
    independently and a resumed job samples as the uninterrupted one would."""
    return zlib.crc32(f"{seed}:{request_id!r}".encode())


SAMPLING_KEYS = "seed and prompt"  # `sampling.key_seed`; "seed" alone before 2026-11-28 (`META_DEFAULTS`)


def job_meta(args: argparse.Namespace, job: Job, llm: LLM | None = None) -> dict:
    """What an output depends on, beyond its input lines: a resume must match all of it. With `llm` (once it
    is built), also the KV cache's dtype its engine runs with: an int8 request under a policy that chose the
    resident engine ran exact."""
    model = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    meta = {"model": model, "dtype": args.dtype, "input_format": job.format.name,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "top_k": args.top_k, "seed": args.seed, "stop": args.stop or None, "logprobs": args.logprobs}
    if llm is not None:
        meta["kv_cache_dtype"] = "auto" if llm.policy == "resident" else args.kv_cache_dtype
    if any(req.sampling.get("temperature", args.temperature) > 0 for req in job.requests):
        meta["sampling_keys"] = SAMPLING_KEYS  # what a sampled token depends on, beside the settings above
    return meta


def prompt_ids(req: JobRequest, source: ModelSource, chat: ChatTemplate | None) -> tuple[int, ...]:
    prompt = req.prompt
    if req.messages is not None:
        if chat is None:
            raise missing_template(source.name)
        prompt = chat.token_ids(req.messages, source.tokenizer)
    return encode_prompt(source.cfg, source.tokenizer, prompt, "prompt")


def encode_job(job: Job, source: ModelSource, model: str) -> Ready:
    """Every request's prompt as token ids; those that cannot run (empty, too long, no chat template)
    join `job.bad`."""
    if job.format is OPENAI and source.tokenizer is None:
        raise JobInputError(f"{job.path}: OpenAI batch requests need a model with tokenizer.json; {model} has none")
    chat = ChatTemplate.from_model_dir(model) if any(r.messages is not None for r in job.requests) else None
    ready = []
    for req in job.requests:
        try:
            if req.stop and source.tokenizer is None:
                raise PromptError(f"stop strings need a model with tokenizer.json; {model} has none")
            ready.append((req, prompt_ids(req, source, chat)))
        except (PromptError, ChatTemplateError) as e:
            job.bad.append(BadLine(req.line, req.id, str(e)))
    return ready


def handle_invalid(args: argparse.Namespace, job: Job, ready: Ready) -> None:
    """Bad lines: all reported (JobInputError), or with --skip-invalid written to OUT.errors.jsonl."""
    bad = sorted(job.bad, key=lambda b: b.line)
    if not args.skip_invalid:
        errors = [f"{job.path}:{b.line}: {b.reason}" for b in bad]
        if len(errors) > MAX_REPORTED:
            errors = errors[:MAX_REPORTED] + [f"... and {len(errors) - MAX_REPORTED} more bad lines "
                                              f"(--skip-invalid writes them all to OUT.errors.jsonl)"]
        if errors:
            raise JobInputError("\n".join(errors))
        return
    path = sidecar(args.output, ".errors.jsonl")
    write_errors(path, [job.format.error_record(b) for b in bad])
    if not ready:
        raise JobInputError(f"{job.path}: no valid requests ({len(job.bad)} invalid lines, listed in {path})")
    if job.bad:
        log.warning("skipping %d invalid input lines (listed with the reason in %s)", len(job.bad), path)


def pending(args: argparse.Namespace, job: Job, ready: Ready) -> tuple[Ready, bool]:
    """(the requests still to run, whether OUT starts fresh): with --resume of an existing OUT (which must have
    been started with this run's settings), those whose ids are not in it yet; otherwise all. Writes nothing:
    a fresh OUT replaces the old one only once the model has loaded (`run_job`)."""
    if args.output is None:
        return ready, False
    if not (args.resume and args.output.exists()):
        return ready, True
    check_meta(args.output, job_meta(args, job))
    done = finished_ids(args.output, job.format.id_key)
    unknown = done - {req.id for req, _ in ready}
    if unknown:
        raise ResumeError(f"cannot resume {args.output}: it holds {job.format.id_key}s that are not valid requests "
                          f"of {job.path}: {', '.join(map(repr, sorted(unknown, key=str)[:5]))}")
    check_finished(args.output, job.path, [req for req, _ in ready if req.id in done])
    log.info("resuming: %d of %d requests already in %s", len(done), len(ready), args.output)
    return [(req, ids) for req, ids in ready if req.id not in done], False


def make_llm(args: argparse.Namespace, source: ModelSource) -> LLM:
    return LLM(source, dtype=args.dtype, policy=args.policy, max_batch_size=args.max_batch_size,
               gpu_memory_gb=args.gpu_memory_gb, hardware=args.hardware, expert_codec=args.expert_codec,
               kv_cache_dtype=args.kv_cache_dtype)


def report(llm: LLM, prompts: int, generated: int, start: float, dtype: str) -> None:
    wall = time.perf_counter() - start
    if llm.stats is not None:
        print(llm.stats.summary(), file=sys.stderr)
    print(f"done: {prompts} prompts, {generated} generated tokens, {wall:.2f} s, "
          f"{generated / max(wall, 1e-9):.1f} tok/s (model {llm.name}, policy {llm.policy}, {dtype})",
          file=sys.stderr)


def run_prompt(args: argparse.Namespace) -> int:
    default_temperature(args, PLAIN)
    source = open_model(args.model, seed=0)  # config and tokenizer only; weights load in LLM
    if source.tokenizer is None:
        raise PromptError(f"--prompt takes text, and {args.model} has no tokenizer.json: give token ids in an "
                          f"--input file instead, a line such as {{\"prompt_token_ids\": [1, 2, 3]}}")
    prompt = encode_prompt(source.cfg, source.tokenizer, args.prompt, "--prompt")
    params = base_params(args, source)
    llm = make_llm(args, source)
    start, generated = time.perf_counter(), 0
    for _, c in llm.generate_iter([prompt], params):
        generated += len(c.token_ids)
        if c.logprobs is not None:
            print(json.dumps(PLAIN.completion_record(JobRequest(0, 0, prompt), [c], llm), ensure_ascii=False))
        else:
            print(c.text if c.text is not None else json.dumps(c.token_ids))
    report(llm, 1, generated, start, args.dtype)
    return 0


def run_job(args: argparse.Namespace) -> int:
    """The --input job, holding --output's lock (`output_lock`) throughout."""
    args.output_started = False  # whether --output holds this job's lines (a fresh one is started once loaded)
    with output_lock(args.output) if args.output is not None else contextlib.nullcontext():
        return _run_locked_job(args)


def _run_locked_job(args: argparse.Namespace) -> int:
    job = read_job(args.input)
    default_temperature(args, job.format)
    source = open_model(args.model, seed=0)
    base = base_params(args, source)
    ready = encode_job(job, source, args.model)
    handle_invalid(args, job, ready)
    todo, fresh = pending(args, job, ready)
    args.output_started = args.output is not None and not fresh
    unbounded = sum("max_new_tokens" not in req.sampling for req, _ in todo)
    if job.format is OPENAI and unbounded:
        log.info("%d of %d requests give no 'max_tokens': each generates at most %d tokens (--max-new-tokens), where "
                 "OpenAI's API goes on to the model's context", unbounded, len(todo), args.max_new_tokens)
    if not todo:
        log.info("nothing to do: all %d requests are in %s", len(ready), args.output)
        return 0
    llm = make_llm(args, source)
    runs, prompts, params = engine_requests(todo, base)
    llm.prepare(prompts, params)  # the engine, before an old OUT is replaced: a model or policy error loses nothing
    if fresh:
        start_output(args.output, job_meta(args, job, llm), [req for req, _ in ready])
        args.output_started = True
    elif args.output is not None:
        check_meta(args.output, job_meta(args, job, llm))  # with what the engine runs, known now
        record_requests(args.output, [req for req, _ in ready])  # every valid line as it reads now
    if args.output is not None and not args.skip_invalid:  # an earlier --skip-invalid run's list: none skipped now
        write_errors(sidecar(args.output, ".errors.jsonl"), [])
    start = time.perf_counter()
    generated = write_completions(llm, job, todo, runs, prompts, params, args.output)
    report(llm, len(todo), generated, start, args.dtype)
    return 0


def sample_seed(seed: int, sample: int) -> int:
    """The seed of completion `sample` of a request whose seed is `seed`: the first keeps it (so n = 1 samples
    as a request without n), the others mix it with their number (apart from `request_seed`'s ids)."""
    return seed if sample == 0 else zlib.crc32(f"{seed}:choice:{sample}".encode())


def engine_requests(todo: Ready, base: SamplingParams):
    """The engine's requests for `todo`, one per completion: (runs, their prompts' token ids, their
    SamplingParams), runs[i] = (index into todo, sample number) of engine request i."""
    per_request = [base.replace(**{"seed": request_seed(base.seed, req.id), "stop": base.stop if req.stop is None else req.stop,
                                   **req.sampling}) for req, _ in todo]
    runs = [(j, s) for j, (req, _) in enumerate(todo) for s in range(req.n)]
    greedy = [j for j, (req, _) in enumerate(todo) if req.n > 1 and per_request[j].temperature == 0]
    if greedy:
        log.warning("%d request(s) ask for n > 1 completions at temperature 0 (greedy): their completions are "
                    "identical", len(greedy))
    return (runs, [todo[j][1] for j, _ in runs],
            [per_request[j].replace(seed=sample_seed(per_request[j].seed, s)) for j, s in runs])


def write_completions(llm: LLM, job: Job, todo: Ready, runs, prompts, params, output: Path | None) -> int:
    """Runs `todo` (as `engine_requests`: runs, prompts, params), writing each request's line once its n
    completions have finished; returns the number of generated tokens. On an exception (Interrupted included)
    the engine stops and what has finished is kept, synced (a request with some of its n completions
    unfinished runs again on --resume)."""
    writer, progress = CompletionWriter(output), Progress(total=len(todo))
    done: dict[int, list] = {}  # request -> its completions so far, by sample
    try:
        with contextlib.closing(llm.generate_iter(prompts, params)) as completions:
            for i, c in completions:
                j, s = runs[i]
                req = todo[j][0]
                got = done.setdefault(j, [None] * req.n)
                got[s] = c
                if all(x is not None for x in got):
                    writer.write(job.format.completion_record(req, got, llm))
                    progress.update(1, sum(len(x.token_ids) for x in got))
                    del done[j]
    finally:
        progress.close()
        writer.close()
    return progress.tokens


def resume_command(argv: list[str]) -> str:
    """The command that resumes an interrupted run of `argv`: this interpreter, the same arguments less
    --overwrite (which would replace the finished lines), plus --resume."""
    kept = [a for a in argv if a != "--overwrite"]
    return command(kept + ([] if "--resume" in kept else ["--resume"]))


def command(argv: list[str]) -> str:
    """`argv` as a command line of this module under this interpreter."""
    return shlex.join([sys.executable, "-m", "moe_jax.generate", *argv])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("moe_jax", "pallas_kernels", "host_ops"):
        logging.getLogger(name).setLevel(logging.INFO)
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = parse_args(argv)
    try:
        with interruptible():
            return run_job(args) if args.input else run_prompt(args)
    except USER_ERRORS as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        if isinstance(e, OutputError) and getattr(args, "output_started", False):  # a full disk: what finished is kept
            print(f"finished requests are in {args.output}; to resume: {resume_command(argv)}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"interrupted by {e}", file=sys.stderr)
        if getattr(args, "output_started", False):
            print(f"finished requests are in {args.output}; to resume: {resume_command(argv)}", file=sys.stderr)
        elif args.output:
            print(f"interrupted before this job wrote to {args.output} (it is as it was); to run it again: "
                  f"{command(argv)}", file=sys.stderr)
        return e.exit_code


def cli() -> None:
    """The console entry point (`python -m moe_jax.generate`, `moe-jax-generate`): `main`'s exit code. After an
    interrupt it leaves without the interpreter's teardown: a signal can land inside JAX or numba (a compile, an
    import), whose threads may then crash the teardown (a segfault after the message, in place of the exit code).
    The output is closed and synced by then."""
    code = main()
    if code in {Interrupted(s).exit_code for s in SIGNALS}:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()

"""Command line: continue a prompt with a trained decoder-only LM.

    python -m moe_jax.generate --workdir=DIR --prompt="def main():" --max_new_tokens=64 \\
        [--temperature=0.8 --top_k=50 --top_p=0.95 --seed=0] [--no_cache]

Reads the newest checkpoint of ``DIR`` (a ``configs/lm.py`` run), its config and ``DIR/tokenizer.model``,
and prints the continuation of each ``--prompt`` (the flag repeats). Generation uses the KV cache;
``--no_cache`` re-runs the model over the whole prefix for every token (the slow reference: with the LM's
dropless routing both give the same tokens). Temperature 0 (the default) is greedy. Bad input prints one
``error:`` line on stderr and exits with status 2; nothing in the workdir is changed.
"""

import argparse
import sys
import time


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        _fail(f"{message}; see python -m moe_jax.generate --help")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m moe_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a language-model run's directory")
    p.add_argument("--prompt", action="append", required=True, help="text to continue (repeatable)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate at most per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 is greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--no_cache", action="store_true", help="recompute the whole prefix every token")
    return p


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv) -> argparse.Namespace:
    """Parses and checks the command line; bad input exits 2 with one ``error:`` line."""
    args = _parser().parse_args(argv)
    checks = (
        (not all(p.strip() for p in args.prompt), "--prompt is empty; pass some text to continue"),
        (args.max_new_tokens < 1, f"--max_new_tokens={args.max_new_tokens} must be >= 1"),
        (not args.temperature >= 0, f"--temperature={args.temperature} must be >= 0 (0 is greedy)"),
        (args.top_k < 0, f"--top_k={args.top_k} must be >= 0 (0 keeps every token)"),
        (not 0 < args.top_p <= 1, f"--top_p={args.top_p} must be in (0, 1]"),
    )
    for bad, message in checks:
        if bad:
            _fail(message)
    return args


def main(argv=None) -> None:
    """Runs the command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from absl import logging

    from moe_jax.errors import ConfigError

    # Library logs (Orbax's restore notes) would bury the output and the one-line errors.
    logging.set_verbosity(logging.FATAL)

    try:
        _generate(args)
    except ConfigError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted", code=130)


def _generate(args):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moe_jax.errors import ConfigError
    from moe_jax.train import decode as decode_lib
    from moe_jax.train.trained import load_trained

    trained = load_trained(args.workdir)
    if trained.config.task != "language_modeling":
        raise ConfigError(
            f"--workdir={args.workdir} holds a {trained.config.task!r} run; moe_jax.generate continues "
            "text with a language model (configs/lm.py)"
        )
    tok = trained.tokenizer
    prompts = [[tok.bos_id] + tok.encode(p) for p in args.prompt]
    lengths_B = np.array([len(p) for p in prompts], np.int32)
    prompt_BL = np.zeros((len(prompts), int(lengths_B.max())), np.int32)
    for i, p in enumerate(prompts):
        prompt_BL[i, : len(p)] = p
    graphdef, state = nnx.split(trained.model)

    @jax.jit
    def run(state, prompt_BL, lengths_B, key):
        return decode_lib.generate(
            nnx.merge(graphdef, state),
            prompt_BL,
            lengths_B,
            max_new_tokens=args.max_new_tokens,
            eos_id=tok.eos_id,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            key=key,
            use_cache=not args.no_cache,
        )

    t0 = time.perf_counter()
    key = jax.random.key(args.seed)
    out_BS = np.asarray(run(state, jnp.asarray(prompt_BL), jnp.asarray(lengths_B), key))
    seconds = time.perf_counter() - t0
    produced = 0
    for prompt, ids in zip(args.prompt, decode_lib.to_token_lists(out_BS, tok.eos_id)):
        produced += len(ids)
        print(prompt + tok.decode(ids), flush=True)
    path = "no cache" if args.no_cache else "KV cache"
    print(
        f"# {produced} tokens in {seconds:.2f} s ({path}, compile included; checkpoint step {trained.step})",
        file=sys.stderr,
        flush=True,
    )


def run():
    """Console-script entry point (``moe-jax-generate``)."""
    main()


if __name__ == "__main__":
    main()

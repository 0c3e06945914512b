"""Command line: Hugging Face checkpoints into a workdir, and a workdir's model out as one.

    python -m moe_jax.convert --from_hf=DIR --workdir=W
    python -m moe_jax.main --config=configs/lm.py:hf=DIR --workdir=W        # fine-tunes from there
    python -m moe_jax.convert --workdir=W --to_hf=OUT

``--from_hf`` reads DIR (``config.json`` + safetensors; the architectures of ``moe_jax.interop.hf``) and
writes ``W/init_params.safetensors``, the parameters a new run in W starts from (sparse upcycling is the
Python API's: ``hf.load(DIR, upcycle=...)``). ``--to_hf``
exports W's newest checkpoint (or, before any training, its converted starting parameters) as a Hugging
Face directory that ``transformers.AutoModelForCausalLM.from_pretrained(OUT)`` loads. Bad input prints one
``error:`` line on stderr and exits with status 2; nothing existing is overwritten.
"""

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        _fail(f"{message}; see python -m moe_jax.convert --help")


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m moe_jax.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="the run directory")
    p.add_argument("--from_hf", help="a Hugging Face model directory to start the run in --workdir from")
    p.add_argument("--to_hf", help="a new directory for the Hugging Face export of --workdir's model")
    return p


def _from_hf(args) -> str:
    from moe_jax.interop import hf
    from moe_jax.train import init_params

    target = os.path.join(args.workdir, init_params.INIT_PARAMS)
    if os.path.isdir(os.path.join(args.workdir, "checkpoints")) or os.path.exists(target):
        raise ValueError(
            f"--workdir={args.workdir} already holds a run or converted parameters; use a new one"
        )
    model, config = hf.load(args.from_hf)
    path = init_params.write_init_params(model, config, args.workdir)
    return (
        f"wrote {path}; fine-tune with: python -m moe_jax.main --config=configs/lm.py:hf={args.from_hf} "
        f"--workdir={args.workdir}"
    )


def _to_hf(args) -> str:
    import ml_collections
    from flax import nnx

    from moe_jax.interop import hf
    from moe_jax.models import DecoderLM, ModelConfig
    from moe_jax.train import init_params
    from moe_jax.train.trained import load_trained

    if not os.path.isdir(args.workdir):
        raise ValueError(f"--workdir={args.workdir} does not exist")
    if os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        trained = load_trained(args.workdir)
        model, config, what = trained.model, trained.config, f"checkpoint step {trained.step}"
    else:
        found = init_params.read_init_params(args.workdir)
        if found is None:
            raise ValueError(f"--workdir={args.workdir} holds no checkpoint and no converted parameters")
        saved, params = found
        config = ml_collections.ConfigDict(saved)
        cfg = ModelConfig.from_mapping(config.model.to_dict(), path="config.model")
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0))))
        state = init_params.apply_init_params(
            nnx.State({0: state}), params, os.path.join(args.workdir, init_params.INIT_PARAMS)
        )[0]
        model, what = nnx.merge(graphdef, state), "converted parameters"
    if config.get("task") != "language_modeling":
        raise ValueError(f"--workdir={args.workdir} holds a {config.get('task')!r} run; only LMs export")
    names = hf.save(model, config, args.to_hf)
    return f"wrote {args.to_hf} ({', '.join(names)}) from the {what}"


def main(argv=None) -> None:
    """Runs the command line (``argv`` without the program name; default ``sys.argv[1:]``)."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    if bool(args.from_hf) == bool(args.to_hf):
        _fail("pass exactly one of --from_hf=DIR (import) or --to_hf=DIR (export)")
    from moe_jax.errors import ConfigError

    try:
        message = _from_hf(args) if args.from_hf else _to_hf(args)
    except (ValueError, ConfigError) as e:
        _fail(" ".join(str(e).split()))
    print(message, flush=True)


def run():
    """Console entry point (``moe-jax-convert``)."""
    main()


if __name__ == "__main__":
    main()

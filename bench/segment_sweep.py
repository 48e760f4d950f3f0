"""Fused Hopper forward time against a forced segment count (KernelConfig.segments), per shape,
next to the count config.pick_segments chooses; the protocol of bench.py (L2 flushed, median).

    python bench/segment_sweep.py [--shapes 1x65536,2x32768] [--counts 1,2,3,4,6,8] [--variant exp]
"""
import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import Timer, make_inputs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x65536,2x32768", help="BxS pairs, comma-separated")
    ap.add_argument("--counts", default="1,2,3,4,6,8", help="segment counts to force")
    ap.add_argument("--variant", default="exp", choices=("exp", "sig"))
    ap.add_argument("--NH", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - any CuPy or driver failure means no GPU to measure on
        sys.exit(f"segment_sweep.py needs a CUDA GPU and CuPy ({type(e).__name__}: {e})")
    import ml_dtypes
    import tfla_cupy
    from tfla_cupy import config
    gate, normalize = {"exp": ("exp", True), "sig": ("sig", False)}[args.variant]
    timer = Timer(cp)
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    DK, DV, L = 128, 256, 128
    print(f"# {args.variant} fw, NH {args.NH}, DK {DK}, DV {DV}, chunk {L}, {sms} SMs")
    print("| B | S | segments | ms | auto picks |")
    print("|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        B, S = (int(x) for x in shape.split("x"))
        x = make_inputs(cp, B, args.NH, S, DK, DV, ml_dtypes.bfloat16)
        auto = config.pick_segments((DV // config.FUSED_BV) * B * args.NH, -(-S // L), sms)[0]
        base = config.pick_config("MmaBF16", DK, DV, L)
        for n in [int(c) for c in args.counts.split(",")]:
            cfg = dataclasses.replace(base, family="sm90", segments=n)
            ms = timer(lambda: tfla_cupy.mlstm(*x, gate=gate, normalize=normalize, chunk_size=L, config=cfg))
            print(f"| {B} | {S} | {n} | {ms:.3f} | {auto} |", flush=True)


if __name__ == "__main__":
    main()

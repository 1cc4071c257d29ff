"""``python -m tf_agg3d.data.synthetic``: writes a synthetic LUNA16 dataset.

The generator is :mod:`tf_agg3d.data.synthetic.luna16` (what is drawn, the layout written);
the flags are :mod:`tf_agg3d.cli.synthetic`'s.

Usage:
  python -m tf_agg3d.data.synthetic --out DIR --n-scans N --seed S [--shape D,H,W] [--overwrite]
"""

from tf_agg3d.cli.synthetic import run_luna16

if __name__ == "__main__":
    run_luna16()

"""``python -m tf_agg3d.data.synthetic``: writes a synthetic LUNA16 dataset.

The generator is :mod:`tf_agg3d.data.synthetic.luna16` (the layout written; what is drawn is
:mod:`tf_agg3d.data.synthetic.default_profile`'s or, with `--profile realistic`,
:mod:`tf_agg3d.data.synthetic.realistic`'s); the flags are :mod:`tf_agg3d.cli.synthetic`'s.

Usage:
  python -m tf_agg3d.data.synthetic --out DIR --n-scans N --seed S [--shape D,H,W] [--overwrite]
      [--profile default|realistic]
"""

from tf_agg3d.cli.synthetic import run_luna16

if __name__ == "__main__":
    run_luna16()

"""``python -m tf_agg3d.data.synthetic_deeplesion``: writes a synthetic DeepLesion dataset.

The generator is :mod:`tf_agg3d.data.synthetic.deeplesion` (what is drawn, the layout
written); the flags are :mod:`tf_agg3d.cli.synthetic`'s.

Usage:
  python -m tf_agg3d.data.synthetic_deeplesion --out DIR --n-series N --seed S [--size 128]
"""

from tf_agg3d.cli.synthetic import run_deeplesion

if __name__ == "__main__":
    run_deeplesion()

"""Train the bundled user-embedding provider of PPD (trl_gfn.models.DigitsUserEncoder) on simulated users.

    python scripts/train_user_encoder.py --out src/trl_gfn/assets/digits-user-encoder

Images: both images of the bundled training pairs with their classifier digits (2 x 2,000). Users: random sets of 2-6 preferred
digits, K = 4 context pairs and 8 query pairs each (see train_digits_user_encoder). Prints the loss and the query accuracy.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir() and str(_SRC) not in sys.path:
    sys.path.insert(0, str(_SRC))


def main(argv=None) -> None:
    import numpy as np
    import torch
    from PIL import Image

    from trl_gfn.assets import BUNDLED_DIGIT_CLASSIFIER
    from trl_gfn.data.digits_preferences import load_digits_preferences
    from trl_gfn.models.user_encoder import train_digits_user_encoder

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    ds = load_digits_preferences("train")

    def decode(cell):
        return torch.from_numpy(np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)

    raw = ds.cast_column("jpg_0", ds.features["jpg_0"].__class__(decode=False)).cast_column("jpg_1", ds.features["jpg_1"].__class__(decode=False))
    images = torch.stack([decode(c) for c in raw["jpg_0"]] + [decode(c) for c in raw["jpg_1"]])
    digits = torch.tensor(list(ds["digit_0"]) + list(ds["digit_1"]))
    model = train_digits_user_encoder(images, digits, BUNDLED_DIGIT_CLASSIFIER, steps=args.steps, seed=args.seed)
    model.save_pretrained(args.out)
    with open(Path(args.out) / "README.md", "w", encoding="utf-8") as f:
        f.write("# DigitsUserEncoder\n\nThe user-embedding provider of trl-gfn's PPD trainer for the bundled digits model: e_u from a user's "
                "4 preference pairs (classifier class probabilities -> MLP). Trained with `scripts/train_user_encoder.py "
                f"--steps {args.steps} --seed {args.seed}` on simulated users with random preferred-digit sets.\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()

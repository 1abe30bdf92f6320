"""Write the four hospitals' data files from scikit-learn's bundled breast-cancer data.

Each hospital gets its own CSV with a realistic skew: different sizes and different case mixes (a
screening clinic sees mostly benign findings, an oncology centre mostly malignant ones). A public
table (labels withheld from training unless a protocol is told they are public) and a held-out
test table complete the set. Deterministic: the same files every time.

    python examples/healthcare/make_data.py [--out examples/healthcare/data]
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

# name: (share of the private records, fraction of benign cases)
HOSPITALS = {
    "hospital_a": (0.40, 0.80),  # a large screening programme: mostly benign findings
    "hospital_b": (0.30, 0.55),  # a general hospital
    "hospital_c": (0.20, 0.20),  # an oncology centre: mostly malignant referrals
    "hospital_d": (0.10, 0.65),  # a small rural clinic
}
TEST_FRACTION, PUBLIC_FRACTION = 0.20, 0.12


def main(argv: list[str] | None = None) -> int:
    from sklearn.datasets import load_breast_cancer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "data"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bunch = load_breast_cancer()
    columns = [c.replace(" ", "_") for c in bunch.feature_names]
    x, y = bunch.data, bunch.target  # target 1 = benign, 0 = malignant
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    n_test, n_public = int(TEST_FRACTION * len(y)), int(PUBLIC_FRACTION * len(y))
    test, public, private = order[:n_test], order[n_test:n_test + n_public], order[n_test + n_public:]
    write(out / "test.csv", columns, x[test], y[test])
    write(out / "public.csv", columns, x[public], y[public])

    benign = [i for i in private if y[i] == 1]
    malignant = [i for i in private if y[i] == 0]
    for name, (share, benign_fraction) in HOSPITALS.items():
        n = int(round(share * len(private)))
        n_benign = min(len(benign), int(round(benign_fraction * n)))
        n_malignant = min(len(malignant), n - n_benign)
        rows = benign[:n_benign] + malignant[:n_malignant]
        benign, malignant = benign[n_benign:], malignant[n_malignant:]
        write(out / f"{name}.csv", columns, x[rows], y[rows])
        print(f"{name}: {len(rows)} records, {n_benign} benign / {n_malignant} malignant -> {out / name}.csv")
    return 0


def write(path: Path, columns: list[str], x: np.ndarray, y: np.ndarray) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*columns, "diagnosis"])
        for features, label in zip(x, y, strict=True):
            writer.writerow([f"{v:.6g}" for v in features] + [int(label)])


if __name__ == "__main__":
    raise SystemExit(main())

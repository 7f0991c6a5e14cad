"""A plain-loop implementation of TensorRT's entropy calibration as NVIDIA's open toolkits read it
(pytorch-quantization and ModelOpt, ``_compute_amax_entropy``), written from that description as an independent
reference for lowbit's vectorized search:

- bin 0 takes bin 1's count before the search;
- for each candidate i (``num_levels`` .. len(hist)): P = the first i bins, every outlier added to bin i - 1;
  Q = the first i bins merged into ``num_levels`` levels (bin j to level floor(j * levels / i)), each level's mass
  spread evenly over the level's bins that are non-empty in the histogram, empty bins staying empty;
- KL(P || Q) of the normalised P and Q (infinite where Q is 0 and P is not);
- the least divergence wins, the last candidate on ties.
"""

import math


def reference_kl(hist, i, num_levels=128):
    """KL(P || Q) for the candidate that keeps the first ``i`` bins of ``hist`` (already zero-binned)."""
    p = [float(v) for v in hist[:i]]
    p[i - 1] += sum(hist[i:])
    level_of = [j * num_levels // i for j in range(i)]
    level_mass = [0.0] * num_levels
    level_nonempty = [0] * num_levels
    for j in range(i):
        if hist[j] > 0:
            level_mass[level_of[j]] += hist[j]
            level_nonempty[level_of[j]] += 1
    q = [level_mass[level_of[j]] / level_nonempty[level_of[j]] if hist[j] > 0 else 0.0 for j in range(i)]
    p_total, q_total = sum(p), sum(q)
    kl = 0.0
    for j in range(i):
        if p[j] == 0:
            continue
        if q[j] == 0:
            return math.inf
        pj, qj = p[j] / p_total, q[j] / q_total
        kl += pj * math.log(pj / qj)
    return kl


def zero_binned(hist):
    """The histogram the search reads: bin 0 with bin 1's count."""
    h = [float(v) for v in hist]
    if len(h) > 1:
        h[0] = h[1]
    return h


def reference_entropy_bins(hist, num_levels=128):
    """(i, KL): the number of bins NVIDIA's search keeps and its divergence; the last candidate on ties."""
    h = zero_binned(hist)
    best_i, best_kl = None, math.inf
    for i in range(num_levels, len(h) + 1):
        kl = reference_kl(h, i, num_levels)
        if kl <= best_kl:
            best_i, best_kl = i, kl
    return best_i, best_kl

"""A plain-loop implementation of TensorRT's entropy calibration, written from its public description
(GTC 2017, "8-bit Inference with TensorRT"), as an independent reference for lowbit's vectorized search."""

import math


def reference_kl(hist, i, num_levels=128):
    """KL(P || Q) for the candidate that keeps the first ``i`` bins."""
    total = sum(hist)
    p = [float(v) for v in hist[:i]]
    p[i - 1] += sum(hist[i:])  # outliers go into the last kept bin
    # Q: merge bins into levels, spread each level's mass evenly over its non-empty (in P) bins.
    level_of = [j * num_levels // i for j in range(i)]
    level_mass = [0.0] * num_levels
    level_nonempty = [0] * num_levels
    for j in range(i):
        level_mass[level_of[j]] += hist[j]
        if p[j] > 0:
            level_nonempty[level_of[j]] += 1
    q = [0.0] * i
    for j in range(i):
        if p[j] > 0:
            q[j] = level_mass[level_of[j]] / level_nonempty[level_of[j]]
    q_total = sum(q)
    kl = 0.0
    for j in range(i):
        if p[j] == 0:
            continue
        pj = p[j] / total
        qj = q[j] / q_total if q_total > 0 else 0.0
        if qj == 0:
            return math.inf
        kl += pj * math.log(pj / qj)
    return kl


def reference_entropy_bins(hist, num_levels=128):
    """The candidate i (number of bins kept) with the least divergence; the first one on ties."""
    last = max(j for j, v in enumerate(hist) if v > 0)
    best_i, best_kl = None, math.inf
    for i in range(num_levels, last + 2):
        kl = reference_kl(hist, i, num_levels)
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i, best_kl

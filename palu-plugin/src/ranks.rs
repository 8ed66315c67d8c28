//! Rank allocation under a KV compression target.
//!
//! - `uniform`: every group keeps `ratio · g·dh`.
//! - `fisher-uniform` (the authors' default): every `k_proj` / `v_proj` is one unit; the shared
//!   budget `ratio · 2·L·H_kv·dh` is split in proportion to the units' Fisher importance, the
//!   remainder by largest remainder, each unit's rank evenly over its groups, then rounded.
//! - `fisher`: the same with each group as a unit (its own Fisher importance).
//! - `waterfill` (palu-rs): greedy over chunks of singular directions, taking next the chunk whose
//!   removal would cost most, `w_u · Σ σ²` with `σ` the whitened singular values (each is exactly
//!   the calibration output error the direction carries) and `w_u = F_u² / E[x²]` the Fisher
//!   estimate of the loss sensitivity per unit output error.
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::lowrank::KvKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RankSearch {
    Uniform,
    FisherUniform,
    Fisher,
    Waterfill,
}

impl RankSearch {
    pub fn needs_fisher(self) -> bool {
        !matches!(self, RankSearch::Uniform)
    }
}

/// What the allocator knows about one `k_proj` / `v_proj`.
#[derive(Debug, Clone)]
pub struct ModuleStats {
    pub layer: usize,
    pub kind: KvKind,
    /// Output width of one group, `g·dh`.
    pub group_width: usize,
    /// Largest rank a group can take, `min(g·dh, hidden)`.
    pub group_cap: usize,
    /// Fisher importance of the module (mean over its entries of `sqrt(Σ grad² / n)`).
    pub fisher: f64,
    /// Fisher importance of each group's rows.
    pub group_fisher: Vec<f64>,
    /// Mean squared input activation of the layer, `E[x²]`.
    pub input_power: f64,
    /// Whitened singular values of each group, descending.
    pub sigmas: Vec<Vec<f64>>,
}

pub type Ranks = BTreeMap<(usize, KvKind), Vec<usize>>;

/// Round a group rank to the kernel tile: `max(1, round(r / m)) · m`, capped at the group's full rank.
pub fn round_rank(r: f64, multiple: usize, cap: usize) -> usize {
    let m = multiple.max(1);
    let q = ((r / m as f64).round() as usize).max(1);
    (q * m).min(cap)
}

/// Integer shares of `total` proportional to `weights`, each capped at `caps[i]`, summing to
/// `min(total, Σ caps)` (floor, then largest remainder).
pub fn proportional_shares(weights: &[f64], caps: &[usize], total: usize) -> Vec<usize> {
    let wsum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / wsum).collect();
    let mut shares: Vec<usize> = exact
        .iter()
        .zip(caps)
        .map(|(e, &c)| (e.floor() as usize).min(c))
        .collect();
    let target = total.min(caps.iter().sum());
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let mut assigned: usize = shares.iter().sum();
    // Largest remainder first; loop again (still by remainder) while caps left budget unassigned.
    while assigned < target {
        let before = assigned;
        for &i in &order {
            if assigned == target {
                break;
            }
            if shares[i] < caps[i] {
                shares[i] += 1;
                assigned += 1;
            }
        }
        if assigned == before {
            break;
        }
    }
    shares
}

/// Ranks before rounding for `fisher-uniform` / `fisher`; exposed so tests can check the budget.
pub fn fisher_ranks_unrounded(modules: &[ModuleStats], ratio: f64, per_group: bool) -> Ranks {
    let mut out = Ranks::new();
    if per_group {
        let mut weights = Vec::new();
        let mut caps = Vec::new();
        let mut keys = Vec::new();
        for m in modules {
            for (i, f) in m.group_fisher.iter().enumerate() {
                weights.push(*f);
                caps.push(m.group_cap);
                keys.push((m.layer, m.kind, i));
            }
        }
        let full: usize = modules.iter().map(|m| m.group_width * m.sigmas.len()).sum();
        let shares = proportional_shares(&weights, &caps, (ratio * full as f64).floor() as usize);
        for ((l, k, _), s) in keys.into_iter().zip(shares) {
            out.entry((l, k)).or_default().push(s);
        }
    } else {
        let weights: Vec<f64> = modules.iter().map(|m| m.fisher).collect();
        let caps: Vec<usize> = modules
            .iter()
            .map(|m| m.group_cap * m.sigmas.len())
            .collect();
        let full: usize = modules.iter().map(|m| m.group_width * m.sigmas.len()).sum();
        let shares = proportional_shares(&weights, &caps, (ratio * full as f64).floor() as usize);
        for (m, s) in modules.iter().zip(shares) {
            let g = m.sigmas.len();
            // Evenly over the groups; the first `s % g` groups take one more.
            let ranks = (0..g).map(|i| s / g + usize::from(i < s % g)).collect();
            out.insert((m.layer, m.kind), ranks);
        }
    }
    out
}

/// Allocate group ranks for `method` at `ratio` (kept fraction of K/V width), rounded to `multiple`.
pub fn allocate(method: RankSearch, modules: &[ModuleStats], ratio: f64, multiple: usize) -> Ranks {
    match method {
        RankSearch::Uniform => modules
            .iter()
            .map(|m| {
                let r = round_rank(ratio * m.group_width as f64, multiple, m.group_cap);
                ((m.layer, m.kind), vec![r; m.sigmas.len()])
            })
            .collect(),
        RankSearch::FisherUniform | RankSearch::Fisher => {
            let raw = fisher_ranks_unrounded(modules, ratio, method == RankSearch::Fisher);
            let caps: BTreeMap<_, _> = modules
                .iter()
                .map(|m| ((m.layer, m.kind), m.group_cap))
                .collect();
            raw.into_iter()
                .map(|(key, rs)| {
                    (
                        key,
                        rs.into_iter()
                            .map(|r| round_rank(r as f64, multiple, caps[&key]))
                            .collect(),
                    )
                })
                .collect()
        }
        RankSearch::Waterfill => waterfill(modules, ratio, multiple),
    }
}

fn waterfill(modules: &[ModuleStats], ratio: f64, multiple: usize) -> Ranks {
    use std::collections::BinaryHeap;
    #[derive(PartialEq)]
    struct Item(f64, usize, usize); // value, module, group
    impl Eq for Item {}
    impl PartialOrd for Item {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Item {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0)
        }
    }
    let m_ = multiple.max(1);
    let full: usize = modules.iter().map(|m| m.group_width * m.sigmas.len()).sum();
    let budget = (ratio * full as f64).round() as usize;
    let mut ranks: Vec<Vec<usize>> = modules.iter().map(|m| vec![0; m.sigmas.len()]).collect();
    let weight = |m: &ModuleStats, g: usize| m.group_fisher[g].powi(2) / m.input_power.max(1e-30);
    let chunk = |m: &ModuleStats, g: usize, from: usize| -> (f64, usize) {
        let to = (from + m_).min(m.group_cap);
        (
            weight(m, g) * m.sigmas[g][from..to].iter().map(|s| s * s).sum::<f64>(),
            to - from,
        )
    };
    let mut used = 0;
    let mut heap = BinaryHeap::new();
    // Every group keeps at least one chunk: a zero-rank group would drop its heads entirely.
    for (mi, m) in modules.iter().enumerate() {
        for g in 0..m.sigmas.len() {
            let (_, n) = chunk(m, g, 0);
            ranks[mi][g] = n;
            used += n;
            if n < m.group_cap {
                heap.push(Item(chunk(m, g, n).0, mi, g));
            }
        }
    }
    while let Some(Item(_, mi, g)) = heap.pop() {
        let m = &modules[mi];
        let (_, n) = chunk(m, g, ranks[mi][g]);
        if used + n > budget {
            continue;
        }
        ranks[mi][g] += n;
        used += n;
        if ranks[mi][g] < m.group_cap {
            heap.push(Item(chunk(m, g, ranks[mi][g]).0, mi, g));
        }
    }
    modules
        .iter()
        .zip(ranks)
        .map(|(m, r)| ((m.layer, m.kind), r))
        .collect()
}

/// Fraction of K/V width removed: `1 − Σ ranks / (2·L·H_kv·dh)`.
pub fn kv_reduction(ranks: &Ranks, kv_width: usize) -> f64 {
    let kept: usize = ranks.values().flatten().sum();
    1.0 - kept as f64 / (ranks.len() * kv_width) as f64
}

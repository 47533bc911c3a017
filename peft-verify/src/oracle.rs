//! The f64 oracle: plain loops over `Vec<f64>`, written from the formulas
//! and deliberately sharing no code with `peft-core`. Row-major everywhere:
//! `x [t, in]`, `W [out, in]`, `A [r, in]`, `B [out, r]`.

// Index loops read like the formulas; that is the point of an oracle.
#![allow(clippy::needless_range_loop)]

/// A row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct M {
    /// Rows.
    pub r: usize,
    /// Columns.
    pub c: usize,
    /// Elements, row-major.
    pub d: Vec<f64>,
}

impl M {
    /// A zero matrix.
    pub fn zeros(r: usize, c: usize) -> Self {
        Self { r, c, d: vec![0.0; r * c] }
    }

    /// From row-major data.
    pub fn new(r: usize, c: usize, d: Vec<f64>) -> Self {
        assert_eq!(d.len(), r * c);
        Self { r, c, d }
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.d[i * self.c + j]
    }

    /// `self * other^T`.
    pub fn mul_t(&self, other: &M) -> M {
        assert_eq!(self.c, other.c);
        let mut out = M::zeros(self.r, other.r);
        for i in 0..self.r {
            for j in 0..other.r {
                out.d[i * other.r + j] = (0..self.c).map(|k| self.at(i, k) * other.at(j, k)).sum();
            }
        }
        out
    }

    /// `self * other`.
    pub fn mul(&self, other: &M) -> M {
        assert_eq!(self.c, other.r);
        let mut out = M::zeros(self.r, other.c);
        for i in 0..self.r {
            for j in 0..other.c {
                out.d[i * other.c + j] = (0..self.c).map(|k| self.at(i, k) * other.at(k, j)).sum();
            }
        }
        out
    }

    /// Elementwise absolute value (for error magnitudes).
    pub fn abs(&self) -> M {
        M::new(self.r, self.c, self.d.iter().map(|v| v.abs()).collect())
    }

    /// `self + other`.
    pub fn add(&self, other: &M) -> M {
        M::new(self.r, self.c, self.d.iter().zip(&other.d).map(|(a, b)| a + b).collect())
    }

    /// `s * self`.
    pub fn scale(&self, s: f64) -> M {
        M::new(self.r, self.c, self.d.iter().map(|v| s * v).collect())
    }
}

/// LoRA: `y = x W^T + b + s (x A^T) B^T`.
pub fn lora(x: &M, w: &M, bias: Option<&[f64]>, a: &M, b: &M, s: f64) -> M {
    let mut y = x.mul_t(w).add(&x.mul_t(a).mul_t(b).scale(s));
    if let Some(bias) = bias {
        for i in 0..y.r {
            for j in 0..y.c {
                y.d[i * y.c + j] += bias[j];
            }
        }
    }
    y
}

/// The activations the adapters use.
#[derive(Clone, Copy, Debug)]
pub enum Act {
    /// max(0, z)
    Relu,
    /// z Phi(z), with erf
    Gelu,
    /// z sigmoid(z)
    Silu,
}

impl Act {
    /// f(z).
    pub fn f(self, z: f64) -> f64 {
        match self {
            Act::Relu => z.max(0.0),
            Act::Gelu => 0.5 * z * (1.0 + libm::erf(z / std::f64::consts::SQRT_2)),
            Act::Silu => z / (1.0 + (-z).exp()),
        }
    }
}

/// Bottleneck adapter: `h = x + s (act(x Wd^T + bd) Wu^T + bu)`.
pub fn adapter(x: &M, wd: &M, bd: &[f64], wu: &M, bu: &[f64], act: Act, s: f64) -> M {
    let mut z = x.mul_t(wd);
    for i in 0..z.r {
        for j in 0..z.c {
            z.d[i * z.c + j] = act.f(z.d[i * z.c + j] + bd[j]);
        }
    }
    let mut u = z.mul_t(wu);
    for i in 0..u.r {
        for j in 0..u.c {
            u.d[i * u.c + j] += bu[j];
        }
    }
    x.add(&u.scale(s))
}

/// One attention call: queries `[tq, heads * dh]`, keys and values
/// `[tk, kv_heads * dh]`, prefix keys and values `[p, kv_heads * dh]`.
/// Query `i` sees every prefix position, and real key `j` unless causal
/// and `j > i + tk - tq`, or padded (`pad[j] == 0`). A query that sees
/// nothing outputs zeros.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &M,
    k: &M,
    v: &M,
    pk: &M,
    pv: &M,
    heads: usize,
    kv_heads: usize,
    causal: bool,
    pad: Option<&[u8]>,
) -> M {
    let dh = q.c / heads;
    let (tq, tk, p) = (q.r, k.r, pk.r);
    let mut out = M::zeros(tq, q.c);
    for h in 0..heads {
        let g = h / (heads / kv_heads);
        for i in 0..tq {
            let mut scores: Vec<Option<f64>> = Vec::new();
            for j in 0..p + tk {
                let visible = j < p || {
                    let r = j - p;
                    !(causal && r + tq > i + tk) && pad.is_none_or(|m| m[r] != 0)
                };
                let key = |d: usize| if j < p { pk.at(j, g * dh + d) } else { k.at(j - p, g * dh + d) };
                scores.push(
                    visible.then(|| (0..dh).map(|d| q.at(i, h * dh + d) * key(d)).sum::<f64>() / (dh as f64).sqrt()),
                );
            }
            let max = scores.iter().flatten().cloned().fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue;
            }
            let e: Vec<f64> = scores.iter().map(|s| s.map_or(0.0, |s| (s - max).exp())).collect();
            let z: f64 = e.iter().sum();
            for d in 0..dh {
                let val = |j: usize| if j < p { pv.at(j, g * dh + d) } else { v.at(j - p, g * dh + d) };
                out.d[i * q.c + h * dh + d] = (0..p + tk).map(|j| e[j] / z * val(j)).sum();
            }
        }
    }
    out
}

/// Central differences of `f` at `theta`, one coordinate at a time.
pub fn grad_fd(theta: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut t = theta.to_vec();
    (0..theta.len())
        .map(|i| {
            t[i] = theta[i] + h;
            let up = f(&t);
            t[i] = theta[i] - h;
            let down = f(&t);
            t[i] = theta[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// `sum(g .* y)`: a loss whose gradient with respect to `y` is `g`.
pub fn dot(g: &M, y: &M) -> f64 {
    g.d.iter().zip(&y.d).map(|(a, b)| a * b).sum()
}

/// `a^-1` for a square `a`, by Gauss-Jordan elimination with partial
/// pivoting in f64 (OFT's and BOFT's rotation blocks).
pub fn inverse(a: &M) -> M {
    let n = a.r;
    let (mut m, mut inv) = (a.d.clone(), vec![0.0; n * n]);
    (0..n).for_each(|i| inv[i * n + i] = 1.0);
    for col in 0..n {
        let p = (col..n).max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs())).unwrap_or(col);
        for j in 0..n {
            m.swap(col * n + j, p * n + j);
            inv.swap(col * n + j, p * n + j);
        }
        let d = m[col * n + col];
        for j in 0..n {
            m[col * n + j] /= d;
            inv[col * n + j] /= d;
        }
        for row in (0..n).filter(|&r| r != col) {
            let f = m[row * n + col];
            for j in 0..n {
                m[row * n + j] -= f * m[col * n + j];
                inv[row * n + j] -= f * inv[col * n + j];
            }
        }
    }
    M::new(n, n, inv)
}

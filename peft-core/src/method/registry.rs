//! The one list of methods. (its docs are in the [parent module](super))

use crate::optim::Method;

/// What a method adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// A linear layer's weight ([`LinearAdapter`](super::LinearAdapter)):
    /// LoRA, DoRA, (IA)^3, LoHa, LoKr, VeRA, ...; or an embedding table's
    /// (trainable tokens).
    Weight,
    /// The input of the model (prompt tuning) or the keys and values of
    /// every attention layer (prefix tuning).
    Tokens,
    /// Layers inserted after a block (bottleneck adapters): no PEFT
    /// equivalent.
    Inserted,
    /// A normalization layer's own parameters, trained in place of the
    /// frozen ones and merged by replacement: LN tuning.
    Norm,
}

/// One method: its name and what the rest of the code needs to know of it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MethodSpec {
    /// The name on the command line, in tables and in folder names
    /// (`"lora"`, `"dora"`, ...).
    pub name: &'static str,
    /// Hugging Face PEFT's `peft_type` in `adapter_config.json` (`None`:
    /// no PEFT equivalent). DoRA is `"LORA"` with `use_dora`.
    pub peft_type: Option<&'static str>,
    /// The tag of this crate's adapter files and the key of the optimizer
    /// defaults ([`Method`]).
    pub file_method: Method,
    /// What it adapts.
    pub family: Family,
    /// Whether a merge into the base weights exists.
    pub merges: bool,
    /// One line: the formula.
    pub summary: &'static str,
}

impl MethodSpec {
    /// The default AdamW learning rate ([`Method::default_lr`], with its
    /// sources).
    pub const fn default_lr(&self) -> f64 {
        self.file_method.default_lr()
    }
}

/// Every method, in the order `peft finetune` trains and prints them.
pub const METHODS: [MethodSpec; 22] = [
    MethodSpec {
        name: "lora",
        peft_type: Some("LORA"),
        file_method: Method::Lora,
        family: Family::Weight,
        merges: true,
        summary: "y = x W^T + b + s (x A^T) B^T, s = alpha / r (rsLoRA: alpha / sqrt r)",
    },
    MethodSpec {
        name: "dora",
        peft_type: Some("LORA"),
        file_method: Method::Lora,
        family: Family::Weight,
        merges: true,
        summary: "y = b + (m / ||W + s B A||_row) (x W^T + s (x A^T) B^T)",
    },
    MethodSpec {
        name: "ia3",
        peft_type: Some("IA3"),
        file_method: Method::Ia3,
        family: Family::Weight,
        merges: true,
        summary: "y = (x W^T + b) * l, or (x * l) W^T + b for a feedforward module",
    },
    MethodSpec {
        name: "loha",
        peft_type: Some("LOHA"),
        file_method: Method::Loha,
        family: Family::Weight,
        merges: true,
        summary: "dW = s (W1a W1b) * (W2a W2b), s = alpha / r",
    },
    MethodSpec {
        name: "lokr",
        peft_type: Some("LOKR"),
        file_method: Method::Lokr,
        family: Family::Weight,
        merges: true,
        summary: "dW = s kron(W1, W2), s = alpha / r",
    },
    MethodSpec {
        name: "vera",
        peft_type: Some("VERA"),
        file_method: Method::Vera,
        family: Family::Weight,
        merges: true,
        summary: "dW = diag(lambda_b) B diag(lambda_d) A, shared frozen A and B",
    },
    MethodSpec {
        name: "adalora",
        peft_type: Some("ADALORA"),
        file_method: Method::AdaLora,
        family: Family::Weight,
        merges: true,
        summary: "dW = s B diag(E) A, s = alpha / (init_r + 1e-5), the rank allocated per module",
    },
    MethodSpec {
        name: "miss",
        peft_type: Some("MISS"),
        file_method: Method::Miss,
        family: Family::Weight,
        merges: true,
        summary: "dW[o, c] = D[c mod r, o] (balance, mini), or W_{a,c} D[a] + D[a] per r x r block (bat)",
    },
    MethodSpec {
        name: "hra",
        peft_type: Some("HRA"),
        file_method: Method::Hra,
        family: Family::Weight,
        merges: true,
        summary: "W' = W H, H = (I - 2 u_0 u_0^T) ... (I - 2 u_{r-1} u_{r-1}^T) (or over Gram-Schmidt(U))",
    },
    MethodSpec {
        name: "road",
        peft_type: Some("ROAD"),
        file_method: Method::Road,
        family: Family::Weight,
        merges: true,
        summary: "y = R (x W^T + b), R rotating and scaling pairs of outputs (alpha cos theta, alpha sin theta)",
    },
    MethodSpec {
        name: "c3a",
        peft_type: Some("C3A"),
        file_method: Method::C3a,
        family: Family::Weight,
        merges: true,
        summary: "dW[m b + j, n b + t] = w[m, n, (t - j) mod b] / in (block-circulant)",
    },
    MethodSpec {
        name: "shira",
        peft_type: Some("SHIRA"),
        file_method: Method::Shira,
        family: Family::Weight,
        merges: true,
        summary: "dW[rows[j], cols[j]] = w[j] over a saved sparse mask of r (in + out) positions",
    },
    MethodSpec {
        name: "oft",
        peft_type: Some("OFT"),
        file_method: Method::Oft,
        family: Family::Weight,
        merges: true,
        summary: "W' = W R_bd^T, R_bd = diag(R_k), R_k = Cayley(Q_k) (Neumann series or exact), Q_k skew-symmetric",
    },
    MethodSpec {
        name: "boft",
        peft_type: Some("BOFT"),
        file_method: Method::Boft,
        family: Family::Weight,
        merges: true,
        summary: "W' = (W M^T) s, M = prod_f P_f diag(Cayley(R_f,k)) P_f^T (butterfly factors)",
    },
    MethodSpec {
        name: "fourierft",
        peft_type: Some("FOURIERFT"),
        file_method: Method::FourierFt,
        family: Family::Weight,
        merges: true,
        summary: "dW = Re(ifft2(S)) scaling, S sparse: w[j] at frequencies regenerated from a seed (torch's randperm)",
    },
    MethodSpec {
        name: "randlora",
        peft_type: Some("RANDLORA"),
        file_method: Method::RandLora,
        family: Family::Weight,
        merges: true,
        summary: "dW = s UB UA, UA rows lambda[k, b] A[k] * gamma[b], UB columns B[:, b, k] (shared random bases)",
    },
    MethodSpec {
        name: "vblora",
        peft_type: Some("VBLORA"),
        file_method: Method::VbLora,
        family: Family::Weight,
        merges: true,
        summary: "dW = B A, each sub-vector of A and B a softmax mix of its top-k entries of a shared vector bank",
    },
    MethodSpec {
        name: "ln_tuning",
        peft_type: Some("LN_TUNING"),
        file_method: Method::LnTuning,
        family: Family::Norm,
        merges: true,
        summary: "y = norm(x) * w' (+ b'): the norm's weight and bias replaced by trained copies",
    },
    MethodSpec {
        name: "trainable_tokens",
        peft_type: Some("TRAINABLE_TOKENS"),
        file_method: Method::TrainableTokens,
        family: Family::Weight,
        merges: true,
        summary: "E'[indices[i]] = rows[i]: chosen embedding rows (and a tied output layer's) replaced by trained ones",
    },
    MethodSpec {
        name: "adapter",
        peft_type: None,
        file_method: Method::Adapter,
        family: Family::Inserted,
        merges: false,
        summary: "h + f(h W_down^T + b_down) W_up^T + b_up after attention and after the MLP",
    },
    MethodSpec {
        name: "prompt",
        peft_type: Some("PROMPT_TUNING"),
        file_method: Method::Prompt,
        family: Family::Tokens,
        merges: false,
        summary: "trained embeddings prepended to the input",
    },
    MethodSpec {
        name: "prefix",
        peft_type: Some("PREFIX_TUNING"),
        file_method: Method::Prefix,
        family: Family::Tokens,
        merges: false,
        summary: "trained keys and values prepended in every attention layer",
    },
];

/// The method named `name` (case-sensitive, as listed).
pub fn find(name: &str) -> Option<&'static MethodSpec> {
    METHODS.iter().find(|m| m.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_file_method_is_listed() {
        for (i, a) in METHODS.iter().enumerate() {
            assert!(METHODS.iter().skip(i + 1).all(|b| b.name != a.name), "{} twice", a.name);
            assert_eq!(find(a.name).map(|m| m.name), Some(a.name));
        }
        // The match is exhaustive: a new file method fails to compile here
        // until it is added to the list below and to METHODS.
        let known = |m: Method| match m {
            Method::Lora | Method::Adapter | Method::Prompt | Method::Prefix => true,
            Method::Ia3 | Method::Loha | Method::Lokr | Method::Vera => true,
            Method::AdaLora | Method::Miss | Method::Hra | Method::Road | Method::C3a | Method::Shira => true,
            Method::Oft | Method::Boft | Method::FourierFt | Method::RandLora => true,
            Method::VbLora | Method::LnTuning | Method::TrainableTokens => true,
        };
        for m in [
            Method::Lora,
            Method::Adapter,
            Method::Prompt,
            Method::Prefix,
            Method::Ia3,
            Method::Loha,
            Method::Lokr,
            Method::Vera,
            Method::AdaLora,
            Method::Miss,
            Method::Hra,
            Method::Road,
            Method::C3a,
            Method::Shira,
            Method::Oft,
            Method::Boft,
            Method::FourierFt,
            Method::RandLora,
            Method::VbLora,
            Method::LnTuning,
            Method::TrainableTokens,
        ] {
            assert!(known(m));
            assert!(METHODS.iter().any(|s| s.file_method == m), "{m:?} has no entry");
        }
        assert!(METHODS.iter().all(|m| m.merges == matches!(m.family, Family::Weight | Family::Norm)));
    }
}

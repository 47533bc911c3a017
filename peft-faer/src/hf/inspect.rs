//! `peft inspect`'s report of an adapter folder: one [`InspectReport`] built from
//! an [`AdapterSummary`], rendered as text ([`InspectReport::text`]) or as one
//! JSON document ([`InspectReport::json`]). Every method fills the same fields:
//! its name, the configuration fields that change its math, a line of
//! formula, one row per module, the total of trainable parameters, the
//! tensors it replaces whole, and warnings.

use serde_json::{Map, Value, json};

use super::{
    AdaLoraConfig, AdapterSummary, BoftConfig, C3aConfig, FourierFtConfig, HfLoraConfig, HraConfig, LohaConfig,
    LokrConfig, MissConfig, OftConfig, PeftConfig, PromptConfig, RandLoraConfig, RoadConfig, VbLoraConfig, VeraConfig,
};

/// One module's row: the columns of its method, in order, each a name and
/// a value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Row {
    /// `(column, value)`, in the method's order.
    pub cells: Vec<(&'static str, Value)>,
}

impl Row {
    fn extend<const N: usize>(&mut self, cells: [(&'static str, Value); N]) {
        self.cells.extend(cells);
    }

    fn push(&mut self, cell: (&'static str, Value)) {
        self.cells.push(cell);
    }
}

/// What `peft inspect` says of an adapter folder.
#[derive(Clone, Debug, PartialEq)]
pub struct InspectReport {
    /// The method's name (`"lora"` for DoRA too, with `use_dora`).
    pub method: &'static str,
    /// The configuration fields that change the math.
    pub fields: Map<String, Value>,
    /// The first line of the text: the method, its fields, its formula.
    pub headline: String,
    /// Further lines before the table (VeRA's shared projections).
    pub notes: Vec<String>,
    /// One row per module (none for prompt learning).
    pub modules: Vec<Row>,
    /// Trainable parameters.
    pub total_params: usize,
    /// Tensors the adapter replaces whole: name and shape.
    pub replaced: Vec<(String, Vec<usize>)>,
    /// NaN or infinite values, scales that overflow f32, ranks that save
    /// little.
    pub warnings: Vec<String>,
}

/// A module's first two columns.
fn named(name: &str) -> Row {
    Row { cells: vec![("module", json!(name)), ("base_tensor", json!(format!("{name}.weight")))] }
}

/// The sum of every row's `params`.
fn total(rows: &[Row]) -> usize {
    rows.iter()
        .flat_map(|r| r.cells.iter())
        .filter(|(k, _)| *k == "params")
        .filter_map(|(_, v)| v.as_u64())
        .sum::<u64>() as usize
}

impl InspectReport {
    /// The report of `ad` (from [`HfAdapter::summarize`](super::HfAdapter::summarize)).
    ///
    /// # Errors
    /// A message when the summary lacks what its config implies (a prompt
    /// without its tensor, VeRA without its projections).
    pub fn new(ad: &AdapterSummary) -> Result<Self, String> {
        let warnings: Vec<String> = ad
            .nonfinite
            .iter()
            .map(|n| format!("{}: element {} is {} (not finite)", n.tensor, n.index, n.value))
            .collect();
        let dtype = json!(format!("{:?}", ad.dtype));
        let mut r = InspectReport {
            method: "lora",
            fields: Map::new(),
            headline: String::new(),
            notes: Vec::new(),
            modules: Vec::new(),
            total_params: 0,
            replaced: ad.replacements.iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
            warnings,
        };
        match &ad.config {
            PeftConfig::Prompt(p) => r.prompt(p, ad)?,
            PeftConfig::Loha(c) => r.loha(c, ad, dtype),
            PeftConfig::Lokr(c) => r.lokr(c, ad),
            PeftConfig::Vera(c) => r.vera(c, ad, dtype)?,
            PeftConfig::Ia3(_) => r.ia3(ad, dtype),
            PeftConfig::Lora(c) => r.lora(c, ad, dtype),
            PeftConfig::AdaLora(c) => r.adalora(c, ad, dtype),
            PeftConfig::Miss(c) => r.miss(c, ad, dtype),
            PeftConfig::Hra(c) => r.hra(c, ad, dtype),
            PeftConfig::Oft(c) => r.oft(c, ad, dtype),
            PeftConfig::Boft(c) => r.boft(c, ad, dtype),
            PeftConfig::FourierFt(c) => r.fourierft(c, ad, dtype),
            PeftConfig::RandLora(c) => r.randlora(c, ad, dtype),
            PeftConfig::VbLora(c) => r.vblora(c, ad, dtype),
            PeftConfig::Road(c) => r.road(c, ad, dtype),
            PeftConfig::C3a(c) => r.c3a(c, ad, dtype),
            PeftConfig::Shira(_) => r.shira(ad, dtype),
            PeftConfig::LnTuning(_) => r.ln_tuning(ad, dtype),
            PeftConfig::TrainableTokens(_) => r.trainable_tokens(ad, dtype),
        }
        if !r.modules.is_empty() {
            r.total_params = total(&r.modules);
        }
        if !matches!(ad.config, PeftConfig::TrainableTokens(_)) {
            // LoRA's `trainable_token_indices`: rows trained beside the modules.
            for m in &ad.trainable_tokens {
                let (k, params) = (m.indices.len(), m.indices.len() * m.dim);
                r.notes.push(format!("trainable tokens on {}: {k} rows of {} ({params} parameters)", m.name, m.dim));
                r.total_params += params;
            }
        }
        Ok(r)
    }

    /// Prompt or prefix tuning: the table's shape.
    fn prompt(&mut self, p: &PromptConfig, ad: &AdapterSummary) -> Result<(), String> {
        let shape = ad.prompt_shape.as_ref().ok_or("no prompt tensor")?;
        self.method = if p.prefix { "prefix" } else { "prompt" };
        self.total_params = shape.iter().product();
        self.fields = json_map(json!({ "num_virtual_tokens": p.num_virtual_tokens, "token_dim": p.token_dim,
                "num_layers": p.num_layers, "shape": shape }));
        self.headline = format!(
            "method {}: {} virtual tokens, token_dim {}, prompt_embeddings {shape:?}, {} parameters",
            self.method, p.num_virtual_tokens, p.token_dim, self.total_params
        );
        Ok(())
    }

    /// LoHa's modules.
    fn loha(&mut self, c: &LohaConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "loha";
        self.fields = json_map(json!({ "r": c.r, "alpha": c.alpha, "dtype": dtype }));
        self.headline =
            format!("method loha: r={} alpha={} (dW = s (W1a W1b) * (W2a W2b), s = alpha / r)", c.r, c.alpha);
        for m in &ad.loha {
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("out", json!(m.n_out)), ("r", json!(m.r))]);
            row.extend([("alpha", json!(m.alpha)), ("scale", json!(m.alpha / m.r as f64))]);
            row.push(("params", json!(2 * m.r * (m.n_in + m.n_out))));
            self.modules.push(row);
        }
    }

    /// LoKr's modules and factor shapes.
    fn lokr(&mut self, c: &LokrConfig, ad: &AdapterSummary) {
        self.method = "lokr";
        self.fields = json_map(json!({ "r": c.common.r, "alpha": c.common.alpha,
                "decompose_both": c.decompose_both, "decompose_factor": c.decompose_factor }));
        self.headline = format!(
            "method lokr: r={} alpha={} decompose_factor={} (dW = s kron(W1, W2), s = alpha / r)",
            c.common.r, c.common.alpha, c.decompose_factor
        );
        for m in &ad.lokr {
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("out", json!(m.n_out)), ("r", json!(m.r))]);
            row.extend([("alpha", json!(m.alpha)), ("w1", json!(m.w1)), ("w2", json!(m.w2))]);
            row.push(("params", json!(m.params)));
            self.modules.push(row);
        }
    }

    /// VeRA's shared projections and modules.
    fn vera(&mut self, c: &VeraConfig, ad: &AdapterSummary, dtype: Value) -> Result<(), String> {
        let p = ad.vera_projections.ok_or("no VeRA projections")?;
        self.method = "vera";
        let frozen = p.r * (p.max_in + p.max_out);
        self.fields = json_map(json!({ "r": c.r, "d_initial": c.d_initial, "dtype": dtype,
                "projections": { "vera_A": [p.r, p.max_in], "vera_B": [p.max_out, p.r], "frozen_params": frozen } }));
        self.headline = format!("method vera: r={} (dW = diag(lambda_b) B diag(lambda_d) A, no alpha / r)", c.r);
        self.notes.push(format!(
            "shared frozen projections: vera_A [{}, {}], vera_B [{}, {}] ({frozen} parameters)",
            p.r, p.max_in, p.max_out, p.r
        ));
        for m in &ad.vera {
            let mut row = named(&m.name);
            row.extend([("out", json!(m.n_out)), ("r", json!(m.r)), ("params", json!(m.r + m.n_out))]);
            self.modules.push(row);
        }
        Ok(())
    }

    /// AdaLoRA's modules, each with the rank it kept.
    fn adalora(&mut self, c: &AdaLoraConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "adalora";
        let allocated = !c.rank_pattern.is_empty();
        self.fields = json_map(json!({ "init_r": c.init_r, "lora_alpha": c.lora_alpha, "allocated": allocated,
                "dtype": dtype }));
        self.headline = format!(
            "method adalora: init_r={} lora_alpha={} (dW = s B diag(E) A, s = lora_alpha / (init_r + 1e-5)){}",
            c.init_r,
            c.lora_alpha,
            if allocated { ", ranks allocated (rank_pattern)" } else { "" }
        );
        for m in &ad.adalora {
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("out", json!(m.n_out)), ("r", json!(m.r))]);
            row.extend([("scale", json!(m.scale)), ("params", json!(m.r * (m.n_in + m.n_out + 1)))]);
            self.modules.push(row);
        }
    }

    /// SHiRA's modules.
    fn shira(&mut self, ad: &AdapterSummary, dtype: Value) {
        self.method = "shira";
        self.fields = json_map(json!({ "dtype": dtype }));
        self.headline = "method shira: dW[rows[j], cols[j]] = shira_weight[j] (a saved sparse mask)".into();
        for (name, n) in &ad.shira {
            let mut row = named(name);
            row.push(("params", json!(n)));
            self.modules.push(row);
        }
    }

    /// Trainable tokens' embeddings: the tokens and their rows.
    fn trainable_tokens(&mut self, ad: &AdapterSummary, dtype: Value) {
        self.method = "trainable_tokens";
        self.fields = json_map(json!({ "dtype": dtype }));
        self.headline =
            "method trainable_tokens: E'[token_indices[i]] = trainable_tokens_delta[i] (rows replaced)".into();
        for m in &ad.trainable_tokens {
            let mut row = vec![("module", json!(m.name)), ("base_tensor", json!(format!("{}.weight", m.name)))];
            row.extend([("tokens", json!(m.indices)), ("dim", json!(m.dim))]);
            row.push(("params", json!(m.indices.len() * m.dim)));
            self.modules.push(Row { cells: row });
        }
    }

    /// LN tuning's modules: each saved parameter's shape.
    fn ln_tuning(&mut self, ad: &AdapterSummary, dtype: Value) {
        self.method = "ln_tuning";
        self.fields = json_map(json!({ "dtype": dtype }));
        self.headline =
            "method ln_tuning: each module's saved parameters replace the base's (y = norm(x) * w' + b')".into();
        for m in &ad.ln_tuning {
            let mut row = named(&m.name);
            for (param, shape) in &m.params {
                let cell = match param.as_str() {
                    "weight" => "weight",
                    "bias" => "bias",
                    _ => "param",
                };
                row.push((cell, json!(shape)));
            }
            row.push(("params", json!(m.params.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>())));
            self.modules.push(row);
        }
    }

    /// C3A's modules.
    fn c3a(&mut self, c: &C3aConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "c3a";
        self.fields = json_map(json!({ "block_size": c.block_size, "dtype": dtype }));
        self.headline = format!(
            "method c3a: block_size={} (dW[m b + j, n b + t] = w[m, n, (t - j) mod b] / in, block-circulant)",
            c.block_size
        );
        for m in &ad.c3a {
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("out", json!(m.n_out)), ("block", json!(m.block))]);
            row.push(("params", json!(m.n_out * m.n_in / m.block)));
            self.modules.push(row);
        }
    }

    /// RoAd's modules.
    fn road(&mut self, c: &RoadConfig, ad: &AdapterSummary, dtype: Value) {
        let variant = match c.variant {
            peft_core::road::RoadVariant::Road1 => "road_1",
            peft_core::road::RoadVariant::Road2 => "road_2",
            peft_core::road::RoadVariant::Road4 => "road_4",
        };
        self.method = "road";
        self.fields = json_map(json!({ "variant": variant, "group_size": c.group_size, "dtype": dtype }));
        self.headline = format!(
            "method road: {variant} group_size={} (pairs of outputs rotated and scaled: y = R (x W^T + b))",
            c.group_size
        );
        for m in &ad.road {
            let mut row = named(&m.name);
            row.extend([("out", json!(m.n_out)), ("params", json!(2 * m.len))]);
            self.modules.push(row);
        }
    }

    /// VB-LoRA's bank and modules (the logits' counts; PEFT's own count
    /// of a top-k file's saved values differs).
    fn vblora(&mut self, c: &VbLoraConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "vblora";
        self.fields = json_map(json!({ "r": c.r, "num_vectors": c.num_vectors, "vector_length": c.vector_length,
            "topk": c.topk, "save_only_topk_weights": c.save_only_topk_weights, "dtype": dtype }));
        self.headline = format!(
            "method vblora: r={} num_vectors={} vector_length={} topk={} (dW = B A, sub-vectors mixed from a shared bank)",
            c.r, c.num_vectors, c.vector_length, c.topk
        );
        if let Some([nv, l]) = ad.vblora_bank {
            self.notes.push(format!("shared vector bank: [{nv}, {l}] ({} parameters)", nv * l));
        }
        for m in &ad.vblora {
            let mut row = named(&m.name);
            let params: usize = m.shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            row.extend([("logits_A", json!(m.shapes[0])), ("logits_B", json!(m.shapes[1])), ("params", json!(params))]);
            self.modules.push(row);
        }
    }

    /// RandLoRA's shared bases and modules.
    fn randlora(&mut self, c: &RandLoraConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "randlora";
        self.fields = json_map(json!({ "r": c.r, "randlora_alpha": c.randlora_alpha, "dtype": dtype,
            "bases": ad.randlora_bases.map(|[a, b]| json!({ "randlora_A": a, "randlora_B": b })) }));
        self.headline = format!(
            "method randlora: r={} randlora_alpha={} (dW = (alpha / r) UB UA over shared random bases)",
            c.r, c.randlora_alpha
        );
        if let Some([a, b]) = ad.randlora_bases {
            self.notes.push(format!("shared frozen bases: randlora_A {a:?}, randlora_B {b:?}"));
        }
        for m in &ad.randlora {
            let mut row = named(&m.name);
            let params = m.lambda[0] * m.lambda[1] + m.gamma[0] * m.gamma[1];
            row.extend([("lambda", json!(m.lambda)), ("gamma", json!(m.gamma)), ("params", json!(params))]);
            self.modules.push(row);
        }
    }

    /// FourierFT's modules: frequencies.
    fn fourierft(&mut self, c: &FourierFtConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "fourierft";
        let pattern: Map<String, Value> = c.n_frequency_pattern.iter().map(|(k, _, n)| (k.clone(), json!(n))).collect();
        self.fields = json_map(json!({
            "n_frequency": c.n_frequency, "n_frequency_pattern": pattern, "scaling": c.scaling,
            "random_loc_seed": c.random_loc_seed, "dtype": dtype,
        }));
        self.headline = format!(
            "method fourierft: n_frequency={} scaling={} random_loc_seed={} (dW = Re(ifft2(S)) scaling, frequencies from torch's randperm)",
            c.n_frequency, c.scaling, c.random_loc_seed
        );
        for m in &ad.fourierft {
            let mut row = named(&m.name);
            row.extend([("frequencies", json!(m.n)), ("params", json!(m.n))]);
            self.modules.push(row);
        }
    }

    /// BOFT's modules: factors kept, blocks, block size and parameters.
    fn boft(&mut self, c: &BoftConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "boft";
        self.fields = json_map(json!({
            "boft_block_size": c.boft_block_size, "boft_block_num": c.boft_block_num,
            "boft_n_butterfly_factor": c.boft_n_butterfly_factor, "dtype": dtype,
        }));
        self.headline = format!(
            "method boft: boft_block_size={} boft_block_num={} boft_n_butterfly_factor={} (W' = (W M^T) s, M the butterfly product)",
            c.boft_block_size, c.boft_block_num, c.boft_n_butterfly_factor
        );
        for m in &ad.boft {
            let mut row = named(&m.name);
            let [f, n, b, _] = m.shape;
            let params = f * n * b * b + m.n_out;
            row.extend([
                ("factors", json!(f)),
                ("blocks", json!(n)),
                ("block_size", json!(b)),
                ("params", json!(params)),
            ]);
            self.modules.push(row);
        }
    }

    /// OFT's modules: blocks, block size and parameters.
    fn oft(&mut self, c: &OftConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "oft";
        self.fields = json_map(json!({
            "r": c.r, "oft_block_size": c.oft_block_size, "use_cayley_neumann": c.use_cayley_neumann,
            "num_cayley_neumann_terms": c.num_cayley_neumann_terms, "coft": c.coft, "eps": c.eps,
            "block_share": c.block_share, "dtype": dtype,
        }));
        let form = if c.use_cayley_neumann {
            format!("Cayley-Neumann, {} terms", c.num_cayley_neumann_terms)
        } else {
            "exact Cayley".to_string()
        };
        let coft = if c.coft { format!(" coft eps={}", c.eps) } else { String::new() };
        self.headline = format!(
            "method oft: r={} oft_block_size={} block_share={}{coft} (W' = W R_bd^T, {form})",
            c.r, c.oft_block_size, c.block_share
        );
        for m in &ad.oft {
            let mut row = named(&m.name);
            let n = m.rows * (m.block * m.block.saturating_sub(1) / 2);
            row.extend([("blocks", json!(m.rows)), ("block_size", json!(m.block)), ("params", json!(n))]);
            self.modules.push(row);
        }
    }

    /// HRA's modules.
    fn hra(&mut self, c: &HraConfig, ad: &AdapterSummary, dtype: Value) {
        self.method = "hra";
        self.fields = json_map(json!({ "r": c.r, "apply_GS": c.apply_gs, "dtype": dtype }));
        let form =
            if c.apply_gs { "I - 2 W W^T over Gram-Schmidt(U)" } else { "R_0 ... R_{r-1}, R_i = I - 2 u_i u_i^T" };
        self.headline = format!("method hra: r={} apply_GS={} (W' = W H, H = {form})", c.r, c.apply_gs);
        for m in &ad.hra {
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("r", json!(m.r)), ("params", json!(m.n_in * m.r))]);
            self.modules.push(row);
        }
    }

    /// MiSS's modules and their blocks.
    fn miss(&mut self, c: &MissConfig, ad: &AdapterSummary, dtype: Value) {
        use peft_core::miss::MissVariant;
        self.method = "miss";
        let (variant, formula) = match c.variant {
            MissVariant::Balance => ("balance".to_string(), "dW[o, c] = D[c mod r, o]"),
            MissVariant::Mini { mini_r } => (format!("mini, mini_r={mini_r}"), "dW[o, c] = D[c mod r, o mod mini_r]"),
            MissVariant::Bat => ("bat".to_string(), "dW_{a,c} = W_{a,c} D[a] + D[a]"),
        };
        self.fields = json_map(json!({ "r": c.r, "variant": variant, "dtype": dtype }));
        self.headline = format!("method miss: r={} {variant} ({formula})", c.r);
        for m in &ad.miss {
            let mut row = named(&m.name);
            row.extend([("miss_block", json!(m.shape)), ("params", json!(m.shape.iter().product::<usize>()))]);
            self.modules.push(row);
        }
    }

    /// (IA)^3's modules and what each scales.
    fn ia3(&mut self, ad: &AdapterSummary, dtype: Value) {
        self.method = "ia3";
        self.fields = json_map(json!({ "dtype": dtype }));
        self.headline =
            "method ia3: a learned vector scales each module's output (or a feedforward module's input)".into();
        for m in &ad.ia3 {
            let mut row = named(&m.name);
            let scales = if m.feedforward { "input" } else { "output" };
            row.extend([("scales", json!(scales)), ("params", json!(m.len))]);
            self.modules.push(row);
        }
    }

    /// LoRA's (and DoRA's) modules, with warnings for scales that overflow f32 and ranks that save little.
    fn lora(&mut self, c: &HfLoraConfig, ad: &AdapterSummary, dtype: Value) {
        self.fields = json_map(json!({ "use_dora": c.use_dora, "r": c.r, "lora_alpha": c.lora_alpha,
                "use_rslora": c.use_rslora, "dtype": dtype }));
        let dora = if c.use_dora { " (DoRA: a magnitude per output row)" } else { "" };
        self.headline = format!(
            "method lora{dora}: r={} lora_alpha={} use_rslora={} dtype {:?}",
            c.r, c.lora_alpha, c.use_rslora, ad.dtype
        );
        for (on, variant, tensors) in [
            (c.velora, "VeLoRA (velora_config)", "lora_velora_embed"),
            (c.monteclora, "MonteCLoRA (monteclora_config)", "lora_monteclora_sampler.*"),
        ] {
            if on {
                self.notes.push(format!(
                    "{variant}: {tensors} acts in training only; forward and merge are plain LoRA, as in PEFT"
                ));
            }
        }
        for m in &ad.modules {
            if !(m.scale as f32).is_finite() {
                self.warnings
                    .push(format!("{}: the scale {} overflows f32; a merge would write infinities", m.name, m.scale));
            }
            let min = m.n_in.min(m.n_out);
            if 2 * m.r >= min {
                self.warnings.push(format!(
                    "{}: rank {} is close to min(in, out) = {min}; LoRA saves little there",
                    m.name, m.r
                ));
            }
            let mut row = named(&m.name);
            row.extend([("in", json!(m.n_in)), ("out", json!(m.n_out)), ("r", json!(m.r))]);
            row.extend([("alpha", json!(m.alpha)), ("scale", json!(m.scale)), ("params", json!(m.params()))]);
            self.modules.push(row);
        }
    }

    /// One JSON document: `method`, the fields, `modules` (each row an
    /// object), `total_params`, `replaced_tensors`, `warnings`.
    pub fn json(&self) -> Value {
        let mut doc = Map::new();
        doc.insert("method".into(), json!(self.method));
        doc.extend(self.fields.clone());
        if !self.modules.is_empty() {
            let rows: Vec<Value> = self
                .modules
                .iter()
                .map(|row| Value::Object(row.cells.iter().map(|(k, v)| ((*k).into(), v.clone())).collect()))
                .collect();
            doc.insert("modules".into(), Value::Array(rows));
        }
        doc.insert("total_params".into(), json!(self.total_params));
        doc.insert("replaced_tensors".into(), json!(self.replaced.iter().map(|t| &t.0).collect::<Vec<_>>()));
        doc.insert("warnings".into(), json!(self.warnings));
        Value::Object(doc)
    }

    /// The text: the headline, the notes, a table of the modules (their
    /// columns, in order), the total, the replaced tensors, the warnings.
    pub fn text(&self) -> String {
        let mut out = vec![self.headline.clone()];
        out.extend(self.notes.iter().cloned());
        if let Some(first) = self.modules.first() {
            let cols: Vec<&str> = first.cells.iter().map(|(k, _)| *k).collect();
            let cell = |v: &Value| match v {
                Value::String(s) => s.clone(),
                Value::Array(a) => a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join("x"),
                v => v.to_string(),
            };
            let table: Vec<Vec<String>> =
                self.modules.iter().map(|row| row.cells.iter().map(|(_, v)| cell(v)).collect()).collect();
            let widths: Vec<usize> = (0..cols.len())
                .map(|i| {
                    table.iter().map(|r| r.get(i).map_or(0, String::len)).chain([cols[i].len()]).max().unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<String>| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .enumerate()
                    .map(|(i, (c, w))| if i < 2 { format!("{c:<w$}") } else { format!("{c:>w$}") })
                    .collect();
                padded.join(" ").trim_end().to_string()
            };
            out.push(line(cols.iter().map(|c| c.replace('_', " ")).collect()));
            out.extend(table.into_iter().map(line));
            out.push(format!("total: {} modules, {} trainable parameters", self.modules.len(), self.total_params));
        }
        out.extend(self.replaced.iter().map(|(name, shape)| format!("replaces {name} {shape:?} whole")));
        out.extend(self.warnings.iter().map(|w| format!("warning: {w}")));
        out.join("\n")
    }
}

/// The object of a `json!({...})` literal.
fn json_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

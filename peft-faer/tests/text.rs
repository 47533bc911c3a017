//! Tokenizers and chat templates against the references transformers and
//! llama.cpp wrote (`tests/fixtures/gguf/tokenizer/`, see `CASES.md` in
//! `../shared/fixtures/gguf/`): `encodings.json` has, for 47 strings,
//! transformers' ids from `tokenizer.json` (`ids`) and llama.cpp's from the
//! GGUF (`ids_llama_cpp`); `chat.json` has `apply_chat_template`'s text and
//! ids for four conversations.
#![cfg(feature = "text")]

use std::path::{Path, PathBuf};

mod common;
use common::smollm2;

use peft_faer::gguf::Gguf;
use peft_faer::text::{ChatTemplate, Message, Tokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn hf_tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("gguf/tokenizer/smollm2")).unwrap()
}

/// SmolLM2's tokenizer metadata, copied from its GGUF by
/// `fixtures/text/make_tokenizer_gguf.py` (gguf-py).
fn gguf_tokenizer() -> Tokenizer {
    Tokenizer::from_gguf(&Gguf::open(&fixtures().join("text/smollm2-tokenizer.gguf")).unwrap()).unwrap()
}

fn strings() -> Vec<Value> {
    json(&fixtures().join("gguf/tokenizer/encodings.json"))["strings"].as_array().unwrap().clone()
}

#[test]
fn tokenizer_json_encodes_and_decodes_as_transformers() {
    let tok = hf_tokenizer();
    let cases = strings();
    assert_eq!(cases.len(), 47);
    for s in &cases {
        let text = s["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids(&s["ids"]), "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), ids(&s["ids_default"]), "{text:?}");
        let got = tok.encode(text, false).unwrap();
        let tokens: Vec<String> = got.iter().map(|&i| tok.token(i).unwrap()).collect();
        let want: Vec<String> =
            s["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
        assert_eq!(tokens, want, "{text:?}");
        assert_eq!(tok.decode(&got, false).unwrap(), s["decoded"].as_str().unwrap(), "{text:?}");
        assert_eq!(tok.decode(&got, true).unwrap(), s["decoded_skip_special"].as_str().unwrap(), "{text:?}");
    }
    assert_eq!((tok.bos, tok.eos, tok.pad), (Some(1), Some(2), Some(2)), "tokenizer_config.json's tokens");
    assert!(tok.is_special(2) && !tok.is_special(19556), "<|im_end|> is special, \"Hello\" is not");
}

#[test]
fn gguf_metadata_encodes_as_llama_cpp_digits_included() {
    let tok = gguf_tokenizer();
    let mut differ = 0;
    for s in &strings() {
        let text = s["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&s["ids_llama_cpp"]), "{text:?}");
        differ += usize::from(got != ids(&s["ids"]));
        // add_bos_token is false: nothing is added.
        assert_eq!(tok.encode(text, true).unwrap(), got);
        assert_eq!(tok.decode(&got, false).unwrap(), s["decoded"].as_str().unwrap(), "{text:?}");
    }
    // The two strings where llama.cpp's smollm pre-tokenizer splits digits
    // first ("  2 apples", "x  12  y").
    assert_eq!(differ, 2);
    assert_eq!((tok.bos, tok.eos, tok.pad, tok.stop_ids.clone()), (Some(1), Some(2), Some(2), vec![2]));
    assert_eq!(tok.vocab_size(), 49152);
}

#[test]
fn streamed_pieces_are_whole_characters_and_add_up_to_the_text() {
    let tok = hf_tokenizer();
    for s in &strings() {
        let text = s["text"].as_str().unwrap();
        let mut stream = tok.stream(false);
        let mut joined = String::new();
        for id in tok.encode(text, false).unwrap() {
            let piece = stream.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}') || text.contains('\u{FFFD}'), "{text:?}: {piece:?}");
            joined.push_str(&piece);
        }
        joined.push_str(&stream.finish().unwrap());
        assert_eq!(joined, s["decoded"].as_str().unwrap());
    }
    // An emoji is 4 bytes over several byte-level tokens: nothing shows
    // until the last of them.
    let ids = tok.encode("😀", false).unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    let mut stream = tok.stream(false);
    let pieces: Vec<String> = ids.iter().map(|&i| stream.push(i).unwrap()).collect();
    assert!(pieces[..pieces.len() - 1].iter().all(String::is_empty), "{pieces:?}");
    assert_eq!(pieces.last().unwrap(), "😀");
}

#[test]
fn chat_template_renders_as_apply_chat_template() {
    let doc = json(&fixtures().join("gguf/tokenizer/chat.json"));
    for (tok, which) in [(hf_tokenizer(), "ids"), (gguf_tokenizer(), "ids_llama_cpp")] {
        let tpl = ChatTemplate::of(&tok).unwrap();
        for c in doc["conversations"].as_array().unwrap() {
            let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            let add_gen = c["add_generation_prompt"].as_bool().unwrap();
            let text = tpl.render(&messages, add_gen).unwrap();
            assert_eq!(text, c["text"].as_str().unwrap(), "{}", c["name"]);
            assert_eq!(tok.encode(&text, false).unwrap(), ids(&c[which]), "{}", c["name"]);
        }
    }
}

#[test]
fn template_errors_name_the_source_and_raise_exception_is_an_error() {
    let tok = hf_tokenizer();
    let src = Path::new("bad.jinja");
    let e = ChatTemplate::new("{% for m in messages %}", src, &tok).unwrap_err().to_string();
    assert!(e.contains("bad.jinja") && e.contains("chat template"), "{e}");
    let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", src, &tok).unwrap();
    let e = t.render(&[Message::new("user", "x")], false).unwrap_err().to_string();
    assert!(e.contains("roles must alternate"), "{e}");
    // Python string methods and transformers' generation tags.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% generation %}{{ m.content.strip().upper() }}{% endgeneration %}{% endfor %}",
        src,
        &tok,
    )
    .unwrap();
    assert_eq!(t.render(&[Message::new("user", "  hi ")], false).unwrap(), "HI");
}

/// A SentencePiece vocabulary in GGUF (`fixtures/text/spm/make.py`:
/// sentencepiece trained it, gguf-py wrote it as llama.cpp's converter
/// does): our ids equal sentencepiece's own (which llama.cpp's SPM
/// tokenizer reproduces), BOS in front as `add_bos_token` says, byte
/// fallback for characters outside the vocabulary, and decoding restores
/// the text.
#[test]
fn gguf_sentencepiece_vocabulary_encodes_as_sentencepiece() {
    let dir = fixtures().join("text/spm");
    let tok = Tokenizer::from_gguf(&Gguf::open(&dir.join("spm.gguf")).unwrap()).unwrap();
    let doc = json(&dir.join("encodings.json"));
    let mut bytes = 0;
    for s in doc["strings"].as_array().unwrap() {
        let text = s["text"].as_str().unwrap();
        let want = ids(&s["ids_sentencepiece"]);
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(tok.encode(text, true).unwrap(), [&[1], &want[..]].concat(), "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), s["decoded"].as_str().unwrap(), "{text:?}");
        bytes += s["pieces"].as_array().unwrap().iter().filter(|p| p.as_str().unwrap().starts_with("<0x")).count();
    }
    assert!(bytes > 10, "the strings exercise byte fallback ({bytes} byte tokens)");
    assert_eq!((tok.bos, tok.eos, tok.vocab_size()), (Some(1), Some(2), 640));
}

#[test]
fn a_gguf_without_a_known_tokenizer_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spm.gguf");
    // A minimal GGUF v3 with one key: tokenizer.ggml.model = "bert".
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = b"tokenizer.ggml.model";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key);
    b.extend(8u32.to_le_bytes());
    b.extend(4u64.to_le_bytes());
    b.extend(b"bert");
    std::fs::write(&path, &b).unwrap();
    let e = Tokenizer::from_gguf(&Gguf::open(&path).unwrap()).unwrap_err().to_string();
    assert!(e.contains("spm.gguf") && e.contains("tokenizer.ggml.model") && e.contains("bert"), "{e}");
}

mod sft {
    use super::*;
    use peft_faer::Faer;
    use peft_faer::hf::HfAdapter;
    use peft_faer::llama::Llama;
    use peft_faer::llama::train::Trainable;
    use peft_faer::text::data::{Dataset, Encoder};
    use peft_faer::text::sft::step_grads;
    use safetensors::SafeTensors;

    fn dir() -> PathBuf {
        fixtures().join("text/sft")
    }

    fn i64s(st: &SafeTensors<'_>, name: &str) -> Vec<i64> {
        st.tensor(name).unwrap().data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
        st.tensor(name).unwrap().data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    /// TRL's SFTTrainer (transformers + PEFT, `make.py`) on the tiny Llama:
    /// for each data form, the tokens and loss masks TRL built, the first
    /// step's loss (1e-4 relative) and the LoRA gradients (largest error
    /// within 1e-3 of the tensor's largest gradient) from the same initial
    /// adapter.
    #[test]
    fn the_first_step_matches_trl_for_every_data_form() {
        let gguf = fixtures().join("gguf/tiny-llama-f32.gguf");
        let model = Llama::open(&gguf).unwrap();
        let tok = Tokenizer::open(&gguf).unwrap();
        let tpl = ChatTemplate::from_file(&dir().join("chat_template.jinja"), &tok).unwrap();
        let backend = Faer::new();
        let init = HfAdapter::read_dir(&dir().join("init")).unwrap();
        // Tensor names in the order LlamaGrads::flatten lists them: by layer,
        // then projection (q before v), A before B.
        let mut modules: Vec<String> = init.modules.iter().map(|m| m.name.clone()).collect();
        modules.sort_by_key(|n| (n.split('.').nth(2).unwrap().parse::<usize>().unwrap(), n.ends_with("v_proj")));
        let names: Vec<String> = modules
            .iter()
            .flat_map(|m| ["lora_A", "lora_B"].map(|k| format!("base_model.model.{m}.{k}.weight")))
            .collect();
        let adapter = Trainable::Peft(Box::new(init));
        let hosted = adapter.hosted(&model).unwrap();
        for form in ["text", "prompt_completion", "messages"] {
            let bytes = std::fs::read(dir().join(format!("{form}.safetensors"))).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let data = Dataset::load(&dir().join(format!("{form}.jsonl")), &Encoder::new(&tok, Some(&tpl))).unwrap();
            for (i, ex) in data.examples.iter().enumerate() {
                let ids: Vec<u32> = i64s(&st, &format!("ids.{i}")).into_iter().map(|v| v as u32).collect();
                assert_eq!(ex.ids, ids, "{form} record {i}: ids");
                let mask: Vec<u8> =
                    i64s(&st, &format!("labels.{i}")).into_iter().map(|l| u8::from(l != -100)).collect();
                assert_eq!(ex.mask, mask, "{form} record {i}: loss mask");
            }
            let batch: Vec<_> = data.examples.iter().collect();
            // One sequence per pass, and all of them in one batched pass.
            for micro in [1, batch.len()] {
                let (loss, grads) = step_grads(&backend, &model, &hosted, &batch, micro).unwrap();
                let want = f64::from_le_bytes(st.tensor("loss").unwrap().data().try_into().unwrap());
                assert!(((loss - want) / want).abs() < 1e-4, "{form} x{micro}: loss {loss} vs TRL's {want}");
                let flat = grads.flatten();
                assert_eq!(flat.len(), names.len());
                for (g, name) in flat.iter().zip(&names) {
                    let r = f32s(&st, &format!("grad.{name}"));
                    assert_eq!(g.len(), r.len(), "{name}");
                    let scale = r.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                    let err = g.iter().zip(&r).fold(0.0f32, |a, (x, y)| a.max((x - y).abs()));
                    assert!(scale > 0.0 && err <= 1e-3 * scale, "{form} x{micro} {name}: max error {err} vs {scale}");
                }
            }
        }
    }
}

/// Text in, text out on the real model, from the lone GGUF file (its
/// tokenizer and chat template are its metadata): the prompts encode to
/// transformers' ids, greedy generation gives transformers' tokens and
/// text (`real/smollm2.json`), the chat stops at `<|im_end|>` as
/// `generate()` did (8 tokens), and a stop string cuts the text before it.
#[test]
fn smollm2_text_generation_matches_transformers() {
    use peft_faer::Faer;
    use peft_faer::llama::Llama;
    use peft_faer::text::generate::Finish;
    use peft_faer::text::{GenerateOptions, generate};
    let Some(path) = smollm2() else { return };
    let model = Llama::open(&path).unwrap();
    let tok = Tokenizer::open(&path).unwrap();
    let tpl = ChatTemplate::of(&tok).unwrap();
    let refs = json(&fixtures().join("gguf/real/smollm2.json"));
    let backend = Faer::new();
    let cases = refs["cases"].as_array().unwrap();
    let case = |name: &str| cases.iter().find(|c| c["name"] == name).unwrap().clone();
    let (plain, chat) = (case("plain"), case("chat"));
    assert_eq!(tok.encode(plain["prompt"].as_str().unwrap(), true).unwrap(), ids(&plain["prompt_ids"]));
    let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
    let rendered = tpl.render(&messages, true).unwrap();
    assert_eq!(rendered, chat["prompt"].as_str().unwrap());
    let prompt = tok.encode(&rendered, false).unwrap();
    assert_eq!(prompt, ids(&chat["prompt_ids"]));

    // Past EOS, 24 tokens: transformers' greedy ids and text.
    let opts = GenerateOptions { max_new_tokens: 24, ignore_eos: true, ..GenerateOptions::default() };
    let mut streamed = String::new();
    let g = generate(&model, &backend, None, &tok, &prompt, &opts, &mut |s| streamed.push_str(s)).unwrap();
    assert_eq!(g.ids, ids(&chat["greedy_ids"]));
    assert_eq!(tok.decode(&g.ids, false).unwrap(), chat["greedy_text"].as_str().unwrap());
    assert_eq!((g.finish.clone(), streamed), (Finish::Length, g.text.clone()));

    // Stopping at EOS: "The capital of France is Paris." and <|im_end|>.
    let opts = GenerateOptions { max_new_tokens: 24, ..GenerateOptions::default() };
    let g = generate(&model, &backend, None, &tok, &prompt, &opts, &mut |_| {}).unwrap();
    assert_eq!(g.ids.len() as u64, chat["generate_len"].as_u64().unwrap());
    assert_eq!((g.text.as_str(), g.finish), ("The capital of France is Paris.", Finish::Eos(2)));

    // The three prompts decoded together (one pass per step for all):
    // each gets transformers' 24 greedy tokens.
    let prompts: Vec<Vec<u32>> = ["plain", "chat", "plain_code"].iter().map(|n| ids(&case(n)["prompt_ids"])).collect();
    let opts = GenerateOptions { max_new_tokens: 24, ignore_eos: true, ..GenerateOptions::default() };
    let all = peft_faer::text::generate_batch(&model, &backend, None, &tok, &prompts, &opts, &mut |_, _| {}).unwrap();
    for (g, n) in all.iter().zip(["plain", "chat", "plain_code"]) {
        assert_eq!(g.ids, ids(&case(n)["greedy_ids"]), "{n} in a batch");
    }
    // Stopping differs per sequence: the chat ends at <|im_end|>, the others run on.
    let opts = GenerateOptions { max_new_tokens: 10, ..GenerateOptions::default() };
    let all = peft_faer::text::generate_batch(&model, &backend, None, &tok, &prompts, &opts, &mut |_, _| {}).unwrap();
    assert_eq!((all[1].ids.len(), all[0].ids.len(), all[2].ids.len()), (8, 10, 10));
    assert_eq!(all[1].text, "The capital of France is Paris.");

    // A stop string: the plain prompt's " Paris.\n\nThe answer" stops before "\n\n".
    let opts = GenerateOptions { max_new_tokens: 24, stop: vec!["\n\n".into()], ..GenerateOptions::default() };
    let mut streamed = String::new();
    let p = ids(&plain["prompt_ids"]);
    let g = generate(&model, &backend, None, &tok, &p, &opts, &mut |s| streamed.push_str(s)).unwrap();
    assert_eq!((g.text.as_str(), streamed.as_str()), (" Paris.", " Paris."));
    assert_eq!(g.finish, Finish::Stop("\n\n".into()));
}

mod finetune_cli {
    use super::*;
    use std::process::Command;

    fn peft(args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_peft")).args(args).output().unwrap()
    }

    fn tiny() -> String {
        fixtures().join("gguf/tiny-llama-f32.gguf").display().to_string()
    }

    fn data(name: &str) -> String {
        fixtures().join("text/sft").join(name).display().to_string()
    }

    /// Twenty steps straight, and ten steps then ten more from the
    /// checkpoint at step 10: the same adapter, bit for bit (the data
    /// order, the optimizer's moments and its step count are restored).
    #[test]
    fn a_resumed_run_ends_where_the_uninterrupted_one_does() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let base = ["finetune", "--model", &tiny(), "--data", &data("text.jsonl"), "--batch-size", "2"];
        let run = |out: &Path, extra: &[&str]| {
            let mut args: Vec<&str> = base.to_vec();
            args.extend(["--out", out.to_str().unwrap(), "--json"]);
            args.extend(extra);
            let o = peft(&args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        run(&a, &["--steps", "20", "--lr-schedule", "cosine", "--warmup", "3"]);
        run(&b, &["--steps", "20", "--lr-schedule", "cosine", "--warmup", "3", "--save-every", "10"]);
        let ckpt = b.join("checkpoint-10");
        let resumed = dir.path().join("c");
        run(
            &resumed,
            &["--steps", "20", "--lr-schedule", "cosine", "--warmup", "3", "--resume", ckpt.to_str().unwrap()],
        );
        let bytes = |p: &Path| std::fs::read(p.join("adapter/adapter_model.safetensors")).unwrap();
        assert_eq!(bytes(&a), bytes(&b));
        assert_eq!(bytes(&a), bytes(&resumed));
        // The checkpoint's adapter is not the final one.
        assert_ne!(bytes(&a), bytes(&ckpt));
        // A checkpoint is never written over: the same run again is refused
        // before training, naming the first output that exists.
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--out", b.to_str().unwrap(), "--steps", "20", "--save-every", "10"]);
        let o = peft(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("exists"), "{err}");
        // Resuming with another batch size is refused, naming it.
        let mut args: Vec<&str> = base.to_vec();
        args[6] = "3";
        let d = dir.path().join("d");
        args.extend(["--out", d.to_str().unwrap(), "--steps", "20", "--resume", ckpt.to_str().unwrap()]);
        let o = peft(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("sequences_per_step"), "{err}");
    }

    /// `--token-indices` names the tokens trainable tokens train on the
    /// user's data: the folder PEFT loads holds them in the order given,
    /// one trained row each; with another method the flag is refused,
    /// naming it, before anything is written.
    #[test]
    fn trainable_tokens_train_the_tokens_named() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tt");
        let base = ["finetune", "--model", &tiny(), "--data", &data("text.jsonl"), "--batch-size", "2"];
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--method", "trainable_tokens", "--token-indices", "9,2,40", "--steps", "3", "--json"]);
        args.extend(["--out", out.to_str().unwrap()]);
        let o = peft(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let ad = peft_faer::hf::HfAdapter::read_dir(&out.join("adapter")).unwrap();
        let peft_faer::hf::PeftConfig::TrainableTokens(c) = &ad.config else { panic!("{:?}", ad.config) };
        assert_eq!(c.token_indices, [9, 2, 40]);
        assert_eq!(ad.trainable_tokens[0].rows.len(), 3 * ad.trainable_tokens[0].dim);
        let out2 = dir.path().join("lora");
        let mut args: Vec<&str> = base.to_vec();
        args.extend(["--method", "lora", "--token-indices", "9", "--steps", "3", "--out", out2.to_str().unwrap()]);
        let o = peft(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("--token-indices"), "{err}");
        assert!(!out2.exists(), "nothing written");
    }

    /// A bad record is refused with the file, the line and the reason, and
    /// nothing is written.
    #[test]
    fn bad_records_are_refused_naming_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            ("{\"text\": \"ok\"}\n{\"text\": 3}\n", ":2:", "\"text\" must be a string"),
            ("{\"text\": \"ok\"}\n\n{not json\n", ":3:", "not JSON"),
            ("{\"prompt\": \"p\"}\n", ":1:", "\"completion\" is missing"),
            ("{\"question\": \"q\"}\n", ":1:", "no \"text\""),
            ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n", ":1:", "no assistant turn"),
            ("{\"messages\": [{\"role\": \"user\"}]}\n", ":1:", "messages[0]"),
        ];
        for (i, (body, line, reason)) in cases.iter().enumerate() {
            let file = dir.path().join(format!("bad{i}.jsonl"));
            std::fs::write(&file, body).unwrap();
            let out = dir.path().join(format!("out{i}"));
            let o = peft(&[
                "finetune",
                "--model",
                &tiny(),
                "--data",
                file.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ]);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{body}");
            assert!(err.contains(&format!("bad{i}.jsonl{line}")) && err.contains(reason), "{err}");
            assert!(!out.exists(), "{body}: {} was written", out.display());
        }
    }

    /// Chat data over the tiny model with a template file: the loss falls
    /// and the PEFT folder is written.
    #[test]
    fn chat_records_train_with_a_template_file() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("chat");
        let o = peft(&[
            "finetune",
            "--model",
            &tiny(),
            "--data",
            &data("messages.jsonl"),
            "--eval",
            &data("messages.jsonl"),
            "--chat-template",
            &data("chat_template.jinja"),
            "--steps",
            "15",
            "--batch-size",
            "2",
            "--json",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        let (b, a) = (r["eval_loss_before"].as_f64().unwrap(), r["eval_loss_after"].as_f64().unwrap());
        assert!(a < b - 0.5, "{b} -> {a}");
        assert!(r["base_bit_identical"].as_bool().unwrap());
        assert!(out.join("adapter/adapter_config.json").is_file());
        // Without a template the tiny model cannot render conversations.
        let o = peft(&[
            "finetune",
            "--model",
            &tiny(),
            "--data",
            &data("messages.jsonl"),
            "--out",
            dir.path().join("x").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("messages.jsonl:1:") && err.contains("chat template"), "{err}");
    }
}

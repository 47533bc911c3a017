//! Memory of a long prompt (issue 27, class 11): the peak resident set of
//! `peft forward` over 16k ids stays below 4x its peak over 1k ids.
//!
//! Before attention ran in blocks of queries and `forward` in chunks
//! through the cache, the scores were `[n, n]` per head (1 GB at 16k ids)
//! and every activation `[n, _]`. Now the scores are one block's and the
//! activations one chunk's; the cache and the ids grow linearly. The peaks
//! are the children's, read with `getrusage(RUSAGE_CHILDREN)`: the largest
//! resident set of any child waited for so far. One test in its own binary,
//! so no other test's children count.
#![cfg(unix)]

use std::process::Command;

mod common;
use common::{case_dir, scratch};

/// The largest resident set of any child waited for so far, in the
/// platform's unit (KiB on Linux; only ratios are used).
fn children_peak_rss() -> i64 {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is
    // given and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage
    };
    usage.ru_maxrss
}

/// `peft forward` over `n` ids of the tiny Llama; the children's peak
/// resident set after it.
fn forward_peak(model: &std::path::Path, n: usize) -> i64 {
    let ids: Vec<String> = (0..n).map(|i| ((i * 7 + 3) % 100).to_string()).collect();
    let o = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["forward", "--model", model.to_str().unwrap(), "--top", "1", "--ids", &ids.join(",")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{n} ids: {}", String::from_utf8_lossy(&o.stderr));
    children_peak_rss()
}

#[test]
fn forward_memory_grows_linearly_with_the_prompt() {
    // The `prefix_llama` fixture's base: hidden 64, 4 heads over 2 key/value heads, vocabulary 100.
    let (case, model) = (case_dir("prefix_llama"), scratch("memory").join("model"));
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(case.join("base_config.json"), model.join("config.json")).unwrap();
    std::fs::copy(case.join("base.safetensors"), model.join("model.safetensors")).unwrap();
    // The 1k run goes first: the peak after the second is the larger of the two.
    let short = forward_peak(&model, 1024);
    let long = forward_peak(&model, 16 * 1024);
    eprintln!("peak RSS: 1k ids {short}, 16k ids {long}: {:.2}x", long as f64 / short as f64);
    assert!(long < 4 * short, "16k ids peak at {long}, 1k ids at {short}");
}

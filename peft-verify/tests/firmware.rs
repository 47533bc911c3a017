//! The firmware smoke test: `peft-verify/firmware` (no_std, no heap,
//! reference backend) runs LoRA forward, backward, an AdamW step and a
//! merge, an adapter forward, a prefix-attention forward, and a
//! fixed-capacity set of three flash adapters (switched one by one, then a
//! mixed batch), and LoRA forward, backward and an AdamW step over an int8
//! and a Q8_0 base in flash, on an emulated
//! Cortex-M4F (`qemu-system-arm -machine mps2-an386 -cpu cortex-m4`) and
//! prints checksums of the bit patterns; the host runs the same code
//! (`firmware/src/smoke.rs`) and the two must be bit-identical.
//!
//! Needs the `thumbv7em-none-eabihf` target and `qemu-system-arm`
//! (`.ci/run` installs both). Without QEMU the test says so and passes,
//! unless `PEFT_REQUIRE_QEMU` is set, as `.ci/run` does.

use std::path::PathBuf;
use std::process::Command;

#[path = "../firmware/src/smoke.rs"]
mod smoke;

#[test]
fn firmware_checksums_match_the_host_bit_for_bit() {
    let host = smoke::run().expect("the smoke computation succeeds on the host");
    if Command::new("qemu-system-arm").arg("--version").output().is_err() {
        assert!(std::env::var_os("PEFT_REQUIRE_QEMU").is_none(), "qemu-system-arm is not installed");
        eprintln!("qemu-system-arm not found: firmware smoke test skipped (install Debian's qemu-system-arm)");
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("firmware");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The firmware's own target folder, named, so that a CARGO_TARGET_DIR
    // set for the workspace does not move the ELF (issue 27, class 11).
    let build = Command::new(&cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--quiet", "--target-dir"])
        .arg(dir.join("target"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("cargo runs");
    assert!(build.success(), "building the firmware failed (is the thumbv7em-none-eabihf target installed?)");
    let elf = dir.join("target/thumbv7em-none-eabihf/release/peft-firmware-smoke");
    if let Ok(out) = Command::new("size").arg("-A").arg(&elf).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        let size = |s: &str| -> u64 {
            text.lines()
                .find(|l| l.starts_with(s))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let flash = size(".vector_table") + size(".text") + size(".rodata");
        let ram = size(".data") + size(".bss");
        eprintln!(
            "firmware: flash (.vector_table + .text + .rodata) {flash} bytes, static RAM (.data + .bss) {ram} bytes"
        );
    }
    let out = Command::new("timeout")
        .arg("60")
        .args(["qemu-system-arm", "-machine", "mps2-an386", "-cpu", "cortex-m4", "-nographic"])
        .args(["-semihosting-config", "enable=on,target=native", "-kernel"])
        .arg(&elf)
        .output()
        .expect("qemu runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "firmware failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.lines().any(|l| l.trim() == "done"), "firmware did not finish: {text}");
    for (name, sum) in host {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} missing: {text}"));
        let fw = u32::from_str_radix(line.split_whitespace().nth(1).unwrap_or(""), 16).expect("hex checksum");
        assert_eq!(fw, sum, "{name}: Cortex-M4F {fw:08x}, host {sum:08x}");
    }
}

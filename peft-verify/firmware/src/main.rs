//! Runs `smoke::run` on the Cortex-M4F and prints each checksum over
//! semihosting, one `name hex` line each, then exits QEMU.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hprintln};
use panic_semihosting as _;

mod smoke;

#[entry]
fn main() -> ! {
    match smoke::run() {
        Ok(sums) => {
            for (name, sum) in sums {
                hprintln!("{} {:08x}", name, sum);
            }
            hprintln!("done");
            debug::exit(debug::EXIT_SUCCESS);
        }
        Err(e) => {
            hprintln!("error {}", e);
            debug::exit(debug::EXIT_FAILURE);
        }
    }
    loop {}
}

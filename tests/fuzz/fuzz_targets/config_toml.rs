//! The `--config` TOML path: arbitrary file text through `config::parse_file_text` (toml, the
//! schema, the one-line error rebuilding from toml's spans, the defaults).
//!
//! Checked beyond not panicking: an error is one line; an accepted config serializes to TOML
//! that parses back to the same config (the file schema is also what `VmConfig` serializes to,
//! and what `vm.info` shows back is built on it).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::assert_one_line;
use vmm::config;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = Path::new("fuzz.toml");
    match config::parse_file_text(&text, path) {
        Ok(vm) => {
            let again = toml::to_string(&vm).expect("an accepted config serializes");
            let back = config::parse_file_text(&again, path)
                .unwrap_or_else(|e| panic!("serialized config does not parse: {e}\n{again}"));
            assert_eq!(back, vm, "TOML round trip changed the config:\n{again}");
        }
        Err(e) => assert_one_line("config file", &vmm::error_chain(&e)),
    }
});

//! Request bodies: the first byte picks a route that takes a body (`vm.create`,
//! `vm.add-device`, `vm.remove-device`, `vm.add-p2p-group`), the rest is its body, through the
//! route's handler (serde_json into the API type, then its `validate`); an accepted
//! `vm.create` then goes on to the VMM's handler, `control::convert::vm_config`, which turns it
//! into a p2pvmm configuration through the `--config` file's schema.
//!
//! Checked beyond not panicking: a refusal is a 400 with a one-line message; a configuration
//! the VMM accepts shows back (`vm.info`'s `api_vm_config`) as a body that converts to the same
//! configuration.

#![no_main]

use api::routes::{self, Handler};
use api::ApiRequest;
use libfuzzer_sys::fuzz_target;
use p2pvmm_fuzz::assert_one_line;
use vmm::control::convert;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let parsing: Vec<_> = routes::routes()
        .iter()
        .filter(|r| matches!(r.handler, Handler::Parse(_)))
        .collect();
    let route = parsing[usize::from(pick) % parsing.len()];
    let Some(result) = route.handler.request(body) else {
        return;
    };
    let request = match result {
        Ok(request) => request,
        Err(failure) => {
            assert_eq!(failure.status, 400, "{}: {}", route.name, failure.message);
            return assert_one_line(route.name, &failure.message);
        }
    };
    if let ApiRequest::VmCreate(body) = request {
        match convert::vm_config(&body) {
            Ok(config) => {
                let shown = convert::api_vm_config(&config);
                let again = convert::vm_config(&shown)
                    .unwrap_or_else(|e| panic!("vm.info's body is refused: {e}\n{shown:?}"));
                assert_eq!(again, config, "vm.info's body converts to another config");
            }
            Err(e) => assert_one_line("vm.create", &e),
        }
    }
});

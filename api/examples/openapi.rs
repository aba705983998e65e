//! Prints the API's OpenAPI document, for validators and client generators:
//! `cargo run -p api --example openapi > p2pvmm-openapi.json`.

fn main() {
    println!("{}", api::openapi::document());
}

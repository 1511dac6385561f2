//! The TOML configuration file (an operator's typo, or a file someone else wrote): the checker
//! and the parser never panic, agree on whether the file is good, and a good file's effective
//! configuration, printed, is a good file again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let problems = gateway::settings::check_text(text, "fuzz.toml");
    let parsed = gateway::settings::parse(text, "fuzz.toml");
    if parsed.is_err() {
        assert!(
            !problems.is_empty(),
            "the parser refused a file the checker passed"
        );
    }
    if problems.is_empty()
        && let Ok(layer) = parsed
    {
        let printed = layer.resolve().to_toml();
        assert!(
            gateway::settings::parse(&printed, "printed.toml").is_ok(),
            "the printed configuration does not parse:\n{printed}"
        );
    }
});

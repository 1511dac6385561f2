//! `gateway check-config FILE`: a good file exits 0 without starting anything; a bad one exits
//! non-zero naming every bad key, not only the first. Runs the binary; needs no root.

use std::process::Command;

fn check(text: &str, name: &str) -> (bool, String, String) {
    let path = std::env::temp_dir().join(format!("gateway-check-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(["check-config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_good_file_passes() {
    let (ok, stdout, stderr) = check(
        "external = \"eth9\"\ninternal = \"eth8\"\nallow_anonymous = true\nidle_timeout = 60\n\
         log_format = \"json\"\nallow_multicast_receive = [\"233.252.0.0/24\"]\n",
        "good.toml",
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("good"), "{stdout}");
}

#[test]
fn every_bad_key_is_named() {
    let (ok, _, stderr) = check(
        "external = \"eth9\"\ninternal = \"eth8\"\nidle_timout = 60\n\
         listen = [\"not an address\"]\nmax_connections = -1\ndatapath = \"kernel\"\n",
        "bad.toml",
    );
    assert!(!ok);
    assert!(
        stderr.contains("key `idle_timout`: unknown key (did you mean `idle_timeout`?)"),
        "{stderr}"
    );
    assert!(stderr.contains("key `listen`"), "{stderr}");
    assert!(stderr.contains("key `max_connections`"), "{stderr}");
    assert!(
        !stderr.contains("`datapath`"),
        "a good key is not named: {stderr}"
    );
    assert!(stderr.contains("3 problem(s)"), "{stderr}");
}

#[test]
fn checks_across_keys_and_the_users_file_are_made_too() {
    let (ok, _, stderr) = check(
        "external = \"eth9\"\ninternal = \"eth8\"\npending_timeout = 1\n\
         users = \"/nonexistent/gateway-users\"\n",
        "range.toml",
    );
    assert!(!ok);
    assert!(
        stderr.contains("`pending_timeout`: must be 5 to 300"),
        "{stderr}"
    );
    let (ok, _, stderr) = check(
        "external = \"eth9\"\ninternal = \"eth8\"\nusers = \"/nonexistent/gateway-users\"\n",
        "users.toml",
    );
    assert!(!ok);
    assert!(stderr.contains("key `users`"), "{stderr}");
    let (ok, _, stderr) = check("external = \n", "syntax.toml");
    assert!(!ok);
    assert!(stderr.contains("line 1"), "{stderr}");
}

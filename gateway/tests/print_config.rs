//! `gateway run --print-config`: the configuration file merged with the flags, as a file
//! `--config` takes back; bad keys and values are refused, naming the key. Runs the binary; needs
//! no root.

use std::process::Command;

fn gateway(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("gateway-{}-{name}", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_file_plus_flags_prints_the_merged_values_and_reads_back() {
    let file = temp_file(
        "merge.toml",
        "external = \"eth9\"\ninternal = \"eth8\"\nmax_connections = 10\n\
         deny = [\"10.0.0.0/8\"]\nallow_anonymous = true\nxdp_mode = \"generic\"\n",
    );
    let config = file.to_str().unwrap();
    let (ok, printed, stderr) = gateway(&[
        "run",
        "--config",
        config,
        "--max-connections",
        "20",
        "--tc-attach",
        "netlink",
        "--print-config",
    ]);
    assert!(ok, "{stderr}");
    let table: toml::Table = printed.parse().unwrap();
    assert_eq!(table["external"].as_str(), Some("eth9"), "from the file");
    assert_eq!(
        table["max_connections"].as_integer(),
        Some(20),
        "the flag wins"
    );
    assert_eq!(table["xdp_mode"].as_str(), Some("generic"), "from the file");
    assert_eq!(
        table["tc_attach"].as_str(),
        Some("netlink"),
        "from the flag"
    );
    assert_eq!(
        table["max_connections_per_client"].as_integer(),
        Some(256),
        "a default"
    );
    assert_eq!(table["deny"].as_array().unwrap().len(), 1);
    assert_eq!(
        table["allow_anonymous"].as_bool(),
        Some(true),
        "from the file"
    );
    // A boolean flag turns off what the file turned on.
    let (ok, off, stderr) = gateway(&[
        "run",
        "--config",
        config,
        "--allow-anonymous=false",
        "--remove-gate-on-exit",
        "--print-config",
    ]);
    assert!(ok, "{stderr}");
    let off: toml::Table = off.parse().unwrap();
    assert_eq!(off["allow_anonymous"].as_bool(), Some(false));
    assert_eq!(
        off["remove_gate_on_exit"].as_bool(),
        Some(true),
        "a bare switch is true"
    );
    // What it prints is a configuration file that means the same.
    let printed_file = temp_file("printed.toml", &printed);
    let (ok, again, stderr) = gateway(&[
        "run",
        "--config",
        printed_file.to_str().unwrap(),
        "--print-config",
    ]);
    assert!(ok, "{stderr}");
    assert_eq!(again, printed);
    let _ = std::fs::remove_file(file);
    let _ = std::fs::remove_file(printed_file);
}

#[test]
fn an_unknown_key_and_a_bad_value_each_name_the_key() {
    for (text, key) in [
        ("extrnal = \"eth0\"\n", "extrnal"),
        (
            "external = \"a\"\ninternal = \"b\"\nmax_bindings_per_user = 0\n",
            "max_bindings_per_user",
        ),
        (
            "external = \"a\"\ninternal = \"b\"\nexternal_ports = \"40000-30000\"\n",
            "external_ports",
        ),
    ] {
        let file = temp_file("bad.toml", text);
        let (ok, _, stderr) =
            gateway(&["run", "--config", file.to_str().unwrap(), "--print-config"]);
        assert!(!ok);
        assert!(stderr.contains(key), "{key}: {stderr}");
        let _ = std::fs::remove_file(file);
    }
}

//! A bad pipeline file fails at load with the file, the key and a hint, exit code 2.
//! Golden files: `tests/golden/config_errors/NAME.toml` and the expected message in
//! `NAME.txt`; set `CAUDAL_BLESS=1` to rewrite the `.txt` files.

use crate::support::*;

#[test]
fn every_example_pipeline_validates() {
    for entry in std::fs::read_dir(manifest_dir().join("config/examples")).expect("examples") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            ok(caudal().arg("validate").arg(&path));
        }
    }
}

#[test]
fn bad_pipelines_fail_with_key_value_and_hint() {
    let dir = manifest_dir().join("tests/golden/config_errors");
    let bless = std::env::var_os("CAUDAL_BLESS").is_some();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("golden dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        seen += 1;
        let out = caudal()
            .current_dir(&dir)
            .arg("validate")
            .arg(path.file_name().expect("name"))
            .output()
            .expect("run validate");
        assert_eq!(out.status.code(), Some(2), "{}: exit code 2", path.display());
        let text = String::from_utf8_lossy(&out.stderr).into_owned();
        let golden = path.with_extension("txt");
        if bless {
            std::fs::write(&golden, &text).expect("bless");
        } else {
            let want = std::fs::read_to_string(&golden)
                .unwrap_or_else(|e| panic!("{}: {e} (run with CAUDAL_BLESS=1)", golden.display()));
            assert_eq!(text, want, "{}", path.display());
        }
    }
    assert!(seen >= 4, "golden config errors are present");
}

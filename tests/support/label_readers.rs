//! The implicit label as readers we did not write see it: Pillow's `getxmp()` (with
//! defusedxml) and exiftool must both find the TC260 label and IPTC's digital source type
//! in every stored PNG, exactly once. Missing tools skip the check on a developer's
//! machine and fail it in CI, where `.ci/run` installs them.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const TRAINED: &str = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia";

fn installed(program: &str, args: &[&str]) -> bool {
    let found = Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is not installed; .ci/run installs it"
        );
        eprintln!("SKIPPED the label check with {program}: not installed");
    }
    found
}

/// Checks every PNG in `paths` with Pillow and exiftool; returns the `ProduceID` each
/// label names, in order.
pub fn assert_labelled(paths: &[&Path]) -> Vec<String> {
    let files: Vec<&str> = paths.iter().map(|p| p.to_str().unwrap()).collect();
    let mut produce_ids = Vec::new();
    if installed("python3", &["-c", "import PIL, defusedxml"]) {
        let script = r#"
import json, sys
from PIL import Image
for path in sys.argv[1:]:
    with Image.open(path) as im:
        im.load()
        xmp = im.getxmp()
        description = xmp["xmpmeta"]["RDF"]["Description"]
        assert not isinstance(description, list), "one rdf:Description"
        label = json.loads(description["AIGC"])
        assert label["Label"] == "1", label
        print(json.dumps({"id": label["ProduceID"], "source": description["DigitalSourceType"],
                          "aigc_text": "AIGC" in im.info}))
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "Pillow: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let read: Value = serde_json::from_str(line).unwrap();
            assert_eq!(read["source"], TRAINED);
            assert_eq!(read["aigc_text"], false, "no bare AIGC text chunk");
            produce_ids.push(read["id"].as_str().unwrap().to_string());
        }
        assert_eq!(produce_ids.len(), files.len());
    }
    if installed("exiftool", &["-ver"]) {
        let out = Command::new("exiftool")
            .args(["-j", "-G1", "-a"])
            .args(&files)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "exiftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(read.len(), files.len());
        for tags in read {
            let labels: Vec<&str> = tags
                .as_object()
                .unwrap()
                .keys()
                .filter(|key| key.to_ascii_lowercase().ends_with(":aigc"))
                .map(String::as_str)
                .collect();
            assert_eq!(labels, ["XMP-TC260:Aigc"], "exactly one label: {tags}");
            let label: Value =
                serde_json::from_str(tags["XMP-TC260:Aigc"].as_str().unwrap()).unwrap();
            assert_eq!(label["Label"], "1");
            assert_eq!(tags["XMP-iptcExt:DigitalSourceType"], TRAINED);
        }
    }
    produce_ids
}

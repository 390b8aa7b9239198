//! The storyboard page: `stories/{story_id}/index.html`, one static file beside the
//! manifest that shows the story's scenes in order as a grid of thumbnails.
//!
//! It must open the same from a local directory (`file://`) and from a CDN, with nothing
//! fetched from anywhere else: the CSS is inline, there is no script, and fonts are the
//! system's (a stack that reaches the common CJK faces, so Chinese prompts render). Links
//! are relative (`../../{key}`): the page and the images live in the same store, the page
//! two levels below the images' root, so the links resolve under a directory, a bucket
//! prefix or a CDN path alike. The one exception is a CDN that refuses unsigned requests
//! (Qiniu timestamp anti-leech): there every link is the CDN's signed URL, made when the
//! page is published ([`PageLinks::signed`]).
//!
//! Prompts and error messages are untrusted text: everything that came from a request or a
//! provider is escaped. Links are built from keys the manifest checked, never from URLs a
//! document brought. And a Content-Security-Policy forbids scripts and lets images come only
//! from the page's own origin and the configured CDN, in case anything ever slips through.

use std::collections::HashMap;
use std::fmt::Write;

use super::manifest::{Manifest, SceneEntry, SceneStatus};
use super::plan::{scene_views, SceneState, StoredPlan, StoryProgress};

/// How a page links to the story's objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PageLinks {
    /// The CDN origin (`https://img.example.com`) images may come from besides the page's
    /// own; none without a CDN.
    pub image_origin: Option<String>,
    /// Absolute (signed) URLs by key, for a CDN that refuses unsigned links; keys not in it,
    /// or all keys without it, are linked relatively.
    pub signed: Option<HashMap<String, String>>,
}

impl PageLinks {
    fn href(&self, key: &str) -> String {
        match self.signed.as_ref().and_then(|signed| signed.get(key)) {
            Some(url) => url.clone(),
            None => format!("{TO_STORE_ROOT}{}", url_path(key)),
        }
    }
}

/// The origin (`scheme://host[:port]`) of a CDN base URL such as
/// `https://img.example.com/stories`, for the page's `img-src`; `None` for anything that is
/// not a plain http(s) origin, which then is not allowed.
pub(crate) fn image_origin(base: &str) -> Option<String> {
    let (scheme, rest) = base.split_once("://")?;
    if !matches!(scheme, "https" | "http") {
        return None;
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.split(':').next().unwrap_or_default();
    let port_ok = authority
        .split_once(':')
        .is_none_or(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    (host_ok && port_ok).then(|| format!("{scheme}://{authority}"))
}

/// From `stories/{story_id}/index.html` back to the store's root.
const TO_STORE_ROOT: &str = "../../";

/// Renders the storyboard page of `manifest`, linking as `links` says. With the story's
/// `plan`, its scenes come first and in its order, and those with no outcome since the plan
/// are shown pending.
pub(crate) fn render(manifest: &Manifest, links: &PageLinks, plan: Option<&StoredPlan>) -> String {
    let mut page = String::with_capacity(4096 + manifest.scenes.len() * 1024);
    let story = escape(&manifest.story_id);
    let totals = StoryProgress::of(manifest, plan);
    let pending = if plan.is_some() || totals.pending > 0 {
        format!(
            r#"<span class="waiting"><b>{}</b> pending</span>"#,
            totals.pending
        )
    } else {
        String::new()
    };
    let _ = write!(
        page,
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src 'self'{image_origin}; script-src 'none'; object-src 'none'; base-uri 'none'; form-action 'none'">
<meta name="generator" content="stage3">
<title>{story} · storyboard</title>
<style>{STYLE}</style>
</head>
<body>
<header>
<h1>{story}</h1>
<p class="totals"><span><b>{scenes}</b> {scene_word}</span><span><b>{succeeded}</b> succeeded</span><span class="{failed_class}"><b>{failed}</b> failed</span>{pending}<span>total <b>{cost}</b></span><span>updated {updated}</span><a href="{manifest_href}">manifest.json</a></p>
</header>
<main class="grid">
"#,
        scenes = totals.total,
        scene_word = if totals.total == 1 { "scene" } else { "scenes" },
        succeeded = totals.succeeded,
        failed = totals.failed,
        failed_class = if totals.failed > 0 { "bad" } else { "" },
        cost = money(totals.cost_usd),
        updated = escape(&manifest.updated_at),
        image_origin = links
            .image_origin
            .as_deref()
            .map(|origin| format!(" {}", escape(origin)))
            .unwrap_or_default(),
        manifest_href = escape(
            &links
                .signed
                .as_ref()
                .and_then(|signed| signed.get(&super::manifest_key(&manifest.story_id)))
                .cloned()
                .unwrap_or_else(|| "manifest.json".to_string())
        ),
    );
    if !manifest.cast.is_empty() {
        cast_row(&mut page, &manifest.cast, links);
    }
    for (index, view) in scene_views(manifest, plan).into_iter().enumerate() {
        match (view.state, view.entry) {
            (SceneState::Pending, entry) => {
                pending_card(&mut page, index + 1, view.scene_id, entry)
            }
            (_, Some(entry)) => card(&mut page, index + 1, entry, links),
            (_, None) => {}
        }
    }
    page.push_str("</main>\n</body>\n</html>\n");
    page
}

/// The story's cast, above its pages: each character's sheet, with its name.
fn cast_row(page: &mut String, cast: &[super::CastMember], links: &PageLinks) {
    // Its style travels with it, so a page without a cast is byte for byte what it was.
    page.push_str("<section class=\"cast\" aria-label=\"cast\"><style>");
    page.push_str(CAST_STYLE);
    page.push_str("</style><h2>Cast</h2>\n");
    for member in cast {
        let full = links.href(&member.image_key);
        let thumb = member
            .thumbnail_key
            .as_deref()
            .map_or_else(|| full.clone(), |key| links.href(key));
        let id = escape(&member.id);
        let name = member
            .name
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| id.clone());
        let _ = writeln!(
            page,
            r#"<figure id="character-{id}"><a href="{full}" title="Open {name}'s sheet full size"><img src="{thumb}" width="160" height="160" alt="{name}: character sheet" loading="lazy" decoding="async"></a><figcaption><b>{name}</b> <span>{id}</span></figcaption></figure>"#,
            full = escape(&full),
            thumb = escape(&thumb),
        );
    }
    page.push_str("</section>\n");
}

/// The cast row spans the grid above the pages.
const CAST_STYLE: &str = ".cast{grid-column:1/-1;display:flex;flex-wrap:wrap;align-items:flex-end;gap:14px}\
.cast h2{width:100%;margin:0;font-size:15px;color:var(--soft);text-transform:uppercase;letter-spacing:.06em}\
.cast figure{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:8px;text-align:center}\
.cast img{display:block;width:160px;height:160px;object-fit:contain;background:var(--frame);border-radius:6px}\
.cast figcaption{margin-top:4px}.cast figcaption span{color:var(--soft);font-size:13px}";

fn card(page: &mut String, number: usize, entry: &SceneEntry, links: &PageLinks) {
    let scene_id = escape(&entry.scene_id);
    let prompt = escape(&entry.prompt);
    let failed = entry.status == SceneStatus::Failed;
    let _ = writeln!(
        page,
        r#"<article class="card{}" id="scene-{scene_id}">"#,
        if failed { " failed" } else { "" }
    );
    let full = entry
        .image_key
        .as_deref()
        .filter(|key| !key.is_empty())
        .map(|key| links.href(key));
    let thumb = entry
        .thumbnail_key
        .as_deref()
        .filter(|key| !key.is_empty())
        .map(|key| links.href(key))
        .or_else(|| full.clone());
    match (failed, full, thumb) {
        (false, Some(full), Some(thumb)) => {
            let (width, height) = shown_size(entry);
            let _ = writeln!(
                page,
                r#"<a class="thumb" href="{full}" title="Open {scene_id} full size"><img src="{thumb}" width="{width}" height="{height}" alt="{scene_id}: {prompt}" loading="lazy" decoding="async"></a>"#,
                full = escape(&full),
                thumb = escape(&thumb),
            );
        }
        _ => {
            let label = if failed {
                entry.error_type.as_deref().unwrap_or("failed")
            } else {
                "no image"
            };
            let _ = writeln!(
                page,
                r#"<div class="thumb missing"><span class="badge">failed</span><strong>{}</strong></div>"#,
                escape(label)
            );
        }
    }
    let _ = writeln!(
        page,
        r#"<div class="body"><h2><span class="number">{number}</span>{scene_id}</h2>"#
    );
    if failed {
        let _ = writeln!(
            page,
            r#"<p class="reason"><b>{}</b> {}</p>"#,
            escape(entry.error_type.as_deref().unwrap_or("failed")),
            escape(entry.message.as_deref().unwrap_or("no reason given"))
        );
    }
    let _ = writeln!(page, r#"<p class="prompt">{prompt}</p>"#);
    let pixels = match (entry.width, entry.height) {
        (Some(w), Some(h)) => format!("{w}×{h} px"),
        _ => escape(&entry.size),
    };
    let cost = entry.cost.map_or_else(|| "—".to_string(), money);
    let _ = writeln!(
        page,
        r#"<dl><dt>size</dt><dd>{pixels}</dd><dt>model</dt><dd>{model}</dd><dt>cost</dt><dd>{cost}</dd></dl></div>"#,
        model = escape(&entry.model),
    );
    page.push_str("</article>\n");
}

/// A scene of the plan with no outcome yet: its id, and its prompt when an earlier outcome
/// of the scene brought one.
fn pending_card(page: &mut String, number: usize, scene_id: &str, earlier: Option<&SceneEntry>) {
    let scene_id = escape(scene_id);
    let _ = writeln!(
        page,
        r#"<article class="card pending" id="scene-{scene_id}">
<div class="thumb missing waiting"><span class="badge">pending</span><strong>not drawn yet</strong></div>
<div class="body"><h2><span class="number">{number}</span>{scene_id}</h2>"#
    );
    if let Some(entry) = earlier {
        let _ = writeln!(page, r#"<p class="prompt">{}</p>"#, escape(&entry.prompt));
    }
    page.push_str("</div>\n</article>\n");
}

/// The thumbnail's pixel size for the `img` element, so the grid does not jump as images
/// arrive; the image's own aspect at the thumbnail bound.
fn shown_size(entry: &SceneEntry) -> (u32, u32) {
    match (entry.width, entry.height) {
        (Some(w), Some(h)) if w > 0 && h > 0 => {
            crate::normalize::thumbnail_size(w, h, super::thumbnail::THUMBNAIL_MAX_SIDE)
        }
        _ => (
            super::thumbnail::THUMBNAIL_MAX_SIDE,
            super::thumbnail::THUMBNAIL_MAX_SIDE,
        ),
    }
}

/// USD with at least cents and at most four decimals: `$0.039`, `$1.50`, `$0.00`.
fn money(usd: f64) -> String {
    let text = format!("{usd:.4}");
    let trimmed = text.trim_end_matches('0');
    let decimals = trimmed.split('.').nth(1).map_or(0, str::len);
    if decimals >= 2 {
        format!("${trimmed}")
    } else {
        format!("${usd:.2}")
    }
}

/// Percent-encodes everything in a key but the characters keys are made of.
fn url_path(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'/' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Escapes text for HTML content and double- or single-quoted attributes.
pub(super) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
:root{color-scheme:light dark;--bg:#f4f2ee;--card:#fff;--ink:#1f2328;--soft:#5d6570;--line:#dedad2;--frame:#e9e5dc;--bad:#b42318;--badbg:#fdecea}
@media (prefers-color-scheme:dark){:root{--bg:#16181c;--card:#1f2228;--ink:#e8e6e3;--soft:#a3a9b3;--line:#2f333b;--frame:#262a31;--bad:#ff7b72;--badbg:#3a1d1d}}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","Noto Sans CJK SC","Source Han Sans SC","PingFang SC","Hiragino Sans GB","Microsoft YaHei","WenQuanYi Micro Hei",sans-serif}
header{padding:24px 28px 8px}
h1{margin:0 0 6px;font-size:26px;letter-spacing:.01em;overflow-wrap:anywhere}
.totals{margin:0;display:flex;flex-wrap:wrap;gap:6px 18px;color:var(--soft)}
.totals b{color:var(--ink)}
.totals .bad,.totals .bad b{color:var(--bad)}
.totals a{color:inherit}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:18px;padding:16px 28px 32px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;overflow:hidden;display:flex;flex-direction:column}
.card.failed{border-color:var(--bad)}
.card.pending{border-style:dashed}
.thumb{display:flex;align-items:center;justify-content:center;aspect-ratio:4/3;min-height:0;overflow:hidden;background:var(--frame)}
.thumb img{display:block;width:100%;height:100%;object-fit:contain}
.thumb.missing{flex-direction:column;gap:4px;background:repeating-linear-gradient(135deg,var(--badbg) 0 14px,transparent 14px 28px);color:var(--bad)}
.thumb.waiting{background:repeating-linear-gradient(135deg,var(--frame) 0 14px,transparent 14px 28px);color:var(--soft)}
.badge{font-size:12px;text-transform:uppercase;letter-spacing:.08em;border:1px solid currentColor;border-radius:99px;padding:0 8px}
.body{padding:10px 14px 14px;display:flex;flex-direction:column;gap:6px;min-width:0}
h2{margin:0;font-size:15px;display:flex;gap:8px;align-items:baseline;overflow-wrap:anywhere}
.number{color:var(--soft);font-weight:400;font-variant-numeric:tabular-nums}
.prompt{margin:0;max-height:7.5em;overflow:auto;white-space:pre-wrap;overflow-wrap:anywhere}
.reason{margin:0;color:var(--bad);overflow-wrap:anywhere;max-height:6em;overflow:auto}
dl{margin:0;display:grid;grid-template-columns:auto 1fr;gap:0 10px;font-size:13px;color:var(--soft)}
dt{font-weight:600}
dd{margin:0;overflow-wrap:anywhere}
"#;

#[cfg(test)]
mod tests {
    use super::super::manifest::{Checked, ManifestEntry, Merge, StoryScene};
    use super::*;

    fn scene(id: &str, prompt: &str) -> StoryScene {
        StoryScene {
            scene_id: id.into(),
            prompt: prompt.into(),
            size: "1792x1024".into(),
            model: "google/gemini-3.1-flash-image".into(),
        }
    }

    fn manifest(entries: Vec<ManifestEntry>) -> Manifest {
        // Unchecked on purpose: the page must be safe whatever an entry holds.
        let mut merge = Merge::new();
        for entry in entries {
            assert!(merge.offer(Checked {
                entry: entry.to_scene_entry(),
                at_ms: 1_790_000_000_000,
            }));
        }
        merge.finish("fox-story", Vec::new())
    }

    fn relative() -> PageLinks {
        PageLinks::default()
    }

    fn succeeded(id: &str, prompt: &str) -> ManifestEntry {
        let mut entry = ManifestEntry::failed(&scene(id, prompt), "x", "x");
        entry.status = SceneStatus::Succeeded;
        entry.error_type = None;
        entry.message = None;
        entry.image_key = Some(format!("{id}-9c1e4f0a2b7d3e55.png"));
        entry.thumbnail_key = Some(format!("thumbnails/{id}-9c1e4f0a2b7d3e55.png"));
        entry.width = Some(1344);
        entry.height = Some(768);
        entry.cost = Some(0.039);
        entry
    }

    #[test]
    fn prompts_and_messages_are_inert_text() {
        let hostile = r#"<script>alert(1)</script><img src=x onerror="alert(2)"> & 'quoted'"#;
        let mut failure = ManifestEntry::failed(&scene("s2", hostile), "content_policy", hostile);
        failure.error_type = Some("<b>x</b>".into());
        let page = render(
            &manifest(vec![succeeded("s1", hostile), failure]),
            &relative(),
            None,
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(!page.contains("<img src=x"), "{page}");
        assert!(!page.contains("<b>x</b>"));
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(page.contains("onerror=&quot;alert(2)&quot;"));
        assert!(page.contains("&amp; &#39;quoted&#39;"));
        assert!(page.contains("script-src 'none'"));
    }

    #[test]
    fn cards_follow_the_manifest_with_relative_links() {
        let page = render(
            &manifest(vec![
                succeeded("scene_001", "一只狐狸在雪中"),
                ManifestEntry::failed(&scene("scene_002", "a storm"), "content_policy", "refused"),
                succeeded("scene_003", "dawn"),
            ]),
            &relative(),
            None,
        );
        let first = page.find(r#"id="scene-scene_001""#).unwrap();
        let second = page.find(r#"id="scene-scene_002""#).unwrap();
        let third = page.find(r#"id="scene-scene_003""#).unwrap();
        assert!(first < second && second < third);
        assert!(page.contains(
            r#"<a class="thumb" href="../../scene_001-9c1e4f0a2b7d3e55.png" title="Open scene_001 full size"><img src="../../thumbnails/scene_001-9c1e4f0a2b7d3e55.png" width="320" height="183""#
        ));
        assert!(page.contains("一只狐狸在雪中"));
        assert!(page.contains(r#"<article class="card failed" id="scene-scene_002">"#));
        assert!(page.contains(r#"<p class="reason"><b>content_policy</b> refused</p>"#));
        assert!(page.contains("<b>3</b> scenes"));
        assert!(page.contains(r#"<span class="bad"><b>1</b> failed</span>"#));
        assert!(page.contains("total <b>$0.078</b>"));
        assert!(page.contains("1344×768 px"));
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "nothing external"
        );
    }

    #[test]
    fn images_come_from_the_page_s_origin_and_the_cdn_only() {
        let page = render(&manifest(vec![succeeded("s1", "p")]), &relative(), None);
        assert!(
            page.contains("img-src 'self'; script-src 'none';"),
            "{page}"
        );
        assert!(page.contains("default-src 'none'"));

        let cdn = PageLinks {
            image_origin: image_origin("https://img.example.com/stories"),
            signed: None,
        };
        let page = render(&manifest(vec![succeeded("s1", "p")]), &cdn, None);
        assert!(
            page.contains("img-src 'self' https://img.example.com; script-src 'none';"),
            "{page}"
        );
        assert!(page.contains(r#"src="../../thumbnails/s1-9c1e4f0a2b7d3e55.png""#));
    }

    #[test]
    fn cdn_origins_are_plain_origins_or_nothing() {
        assert_eq!(
            image_origin("https://img.example.com").as_deref(),
            Some("https://img.example.com")
        );
        assert_eq!(
            image_origin("http://cdn.example.com:8080/a/b?x").as_deref(),
            Some("http://cdn.example.com:8080")
        );
        for bad in [
            "img.example.com",
            "ftp://img.example.com",
            "https://",
            "https://a b.example.com",
            "https://x.example.com'; script-src *",
            "https://user@x.example.com",
            "https://x.example.com:",
        ] {
            assert_eq!(image_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn signed_links_replace_relative_ones_key_by_key() {
        let mut signed = HashMap::new();
        signed.insert(
            "s1-9c1e4f0a2b7d3e55.png".to_string(),
            "https://img.example.com/s1-9c1e4f0a2b7d3e55.png?sign=ab&t=1".to_string(),
        );
        signed.insert(
            "stories/fox-story/manifest.json".to_string(),
            "https://img.example.com/stories/fox-story/manifest.json?sign=cd&t=1".to_string(),
        );
        let links = PageLinks {
            image_origin: Some("https://img.example.com".into()),
            signed: Some(signed),
        };
        let page = render(&manifest(vec![succeeded("s1", "p")]), &links, None);
        assert!(page
            .contains(r#"href="https://img.example.com/s1-9c1e4f0a2b7d3e55.png?sign=ab&amp;t=1""#));
        assert!(page.contains(
            r#"href="https://img.example.com/stories/fox-story/manifest.json?sign=cd&amp;t=1">manifest.json"#
        ));
        // A key without a signed URL stays relative.
        assert!(page.contains(r#"src="../../thumbnails/s1-9c1e4f0a2b7d3e55.png""#));
    }

    #[test]
    fn a_plan_orders_the_cards_and_shows_scenes_without_an_outcome_as_pending() {
        let mut manifest = manifest(vec![
            succeeded("scene_002", "an owl"),
            ManifestEntry::failed(&scene("scene_001", "a storm"), "content_policy", "refused"),
        ]);
        for entry in &mut manifest.scenes {
            entry.updated_at = "2026-09-21T12:00:00.000Z".into();
        }
        let at_ms = super::super::manifest::parse_millis("2026-09-21T11:00:00.000Z").unwrap();
        let plan = StoredPlan {
            plan: super::super::plan::StoryPlan::new(
                "fox-story",
                vec!["scene_001".into(), "scene_002".into(), "scene_003".into()],
                std::time::SystemTime::now(),
            ),
            at_ms,
        };
        let page = render(&manifest, &relative(), Some(&plan));
        let first = page.find(r#"id="scene-scene_001""#).unwrap();
        let second = page.find(r#"id="scene-scene_002""#).unwrap();
        let third = page
            .find(r#"<article class="card pending" id="scene-scene_003">"#)
            .unwrap();
        assert!(first < second && second < third, "{page}");
        assert!(page.contains(r#"<span class="badge">pending</span>"#));
        assert!(page.contains("<b>3</b> scenes"));
        assert!(page.contains(r#"<span class="waiting"><b>1</b> pending</span>"#));

        // An outcome older than the plan is a resubmitted scene's old one: pending again.
        let later = StoredPlan {
            at_ms: at_ms + 2 * 3600 * 1000,
            ..plan
        };
        let page = render(&manifest, &relative(), Some(&later));
        assert!(
            page.contains(r#"<span class="waiting"><b>3</b> pending</span>"#),
            "{page}"
        );
        assert!(page.contains(r#"<p class="prompt">an owl</p>"#));
        // Without a plan the page is as before: no pending count at all.
        assert!(!render(&manifest, &relative(), None).contains(r#"class="waiting"><b>"#));
    }

    #[test]
    fn money_reads_like_money() {
        assert_eq!(money(0.0), "$0.00");
        assert_eq!(money(0.039), "$0.039");
        assert_eq!(money(1.5), "$1.50");
        assert_eq!(money(0.12345), "$0.1235");
    }
}

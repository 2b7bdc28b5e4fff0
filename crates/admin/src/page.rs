//! The status page: the [`StatusReport`] as one self-contained HTML
//! document (inline style, no script, no external asset) that the browser
//! reloads every two seconds.

use std::fmt::Write as _;

use crate::StatusReport;

/// Escapes text for HTML content and attribute values: failure reasons
/// and URLs come from the network.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        match character {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            other => escaped.push(other),
        }
    }
    escaped
}

const STYLE: &str = "
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #1d2329; background: #fafbfc; }
h1 { font-size: 20px; margin: 0 0 4px; }
p.meta { color: #57606a; margin: 0 0 16px; }
.totals { display: flex; gap: 12px; margin-bottom: 20px; flex-wrap: wrap; }
.totals div { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 14px; }
.totals b { display: block; font-size: 18px; }
table { border-collapse: collapse; background: #fff; border: 1px solid #d0d7de; }
th, td { text-align: left; padding: 6px 12px; border-bottom: 1px solid #eaeef2; }
th { background: #f6f8fa; font-weight: 600; }
td, th { white-space: nowrap; }
td.failure { white-space: normal; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 600; padding: 2px 8px; border-radius: 10px; }
.up { background: #dafbe1; color: #116329; }
.ejected { background: #fff1c2; color: #7d4e00; }
.down { background: #ffd8d3; color: #a40e26; }
";

/// The page for `report`.
pub fn render(report: &StatusReport) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>securemesh {role} {listen}</title><style>{STYLE}</style></head><body>\
         <h1>securemesh {role} <code>{listen}</code></h1>\
         <p class=\"meta\">version {version} &middot; up {uptime} s &middot; refreshes every 2 s</p>",
        role = escape(&report.role),
        listen = escape(&report.listen),
        version = escape(&report.version),
        uptime = report.uptime_seconds,
    );
    let _ = write!(
        page,
        "<div class=\"totals\">\
         <div>calls/s<b id=\"rate\">{:.1}</b></div>\
         <div>p50<b>{:.2} ms</b></div>\
         <div>p99<b>{:.2} ms</b></div>\
         <div>in flight<b>{}</b></div>\
         <div>failed recently<b>{} of {}</b></div>",
        report.recent.per_second,
        report.recent.p50_ms,
        report.recent.p99_ms,
        report.in_flight,
        report.recent.failures,
        report.recent.calls,
    );
    if !report.backends.is_empty() {
        let _ = write!(
            page,
            "<div>backends up<b id=\"up\">{} of {}</b></div>",
            report.up(),
            report.backends.len()
        );
    }
    page.push_str("</div>");
    if let Some(discovery) = &report.discovery {
        let _ = write!(
            page,
            "<p class=\"meta\">discovery: <code>{}</code></p>",
            escape(discovery)
        );
    }
    if !report.backends.is_empty() {
        page.push_str(
            "<table id=\"backends\"><thead><tr><th>backend</th><th>state</th><th>health</th>\
             <th>in flight</th><th>calls/s</th><th>p99</th><th>last failure</th></tr></thead><tbody>",
        );
        for backend in &report.backends {
            let state = escape(&backend.state);
            let _ = write!(
                page,
                "<tr data-backend=\"{url}\" data-state=\"{state}\"><td><code>{url}</code></td>\
                 <td><span class=\"state {state}\">{state}</span></td><td>{health}</td>\
                 <td class=\"number\">{in_flight}</td><td class=\"number\">{rate:.1}</td>\
                 <td class=\"number\">{p99:.2} ms</td><td class=\"failure\">{failure}</td></tr>",
                url = escape(&backend.url),
                health = if backend.healthy {
                    "serving"
                } else {
                    "failing"
                },
                in_flight = backend.in_flight,
                rate = backend.recent.per_second,
                p99 = backend.recent.p99_ms,
                failure = backend
                    .last_failure
                    .as_deref()
                    .map_or_else(|| "&ndash;".to_owned(), escape),
            );
        }
        page.push_str("</tbody></table>");
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_shows_each_backend_and_escapes_what_came_from_the_network() {
        let page = render(&crate::report::tests::report());
        assert!(page.contains("data-backend=\"https://127.0.0.1:5001\" data-state=\"up\""));
        assert!(page.contains("data-backend=\"https://127.0.0.1:5002\" data-state=\"down\""));
        assert!(page.contains("1 of 2"));
        assert!(page.contains("&lt;b&gt;connection refused&lt;/b&gt;"));
        assert!(!page.contains("<b>connection refused</b>"));
        assert!(!page.contains("<script"), "the page needs no script");
        assert!(
            !page.contains("http://") && !page.contains("src="),
            "no external asset"
        );
    }
}

//! Writes `docs/sample-import.xlsx`, the spreadsheet a newcomer imports through Swagger: five proxies of the `Demo`
//! provider's `DEMO` package (which `scripts/run.sh` seeds), in both areas, one with credentials.
//!
//! ```text
//! cargo run -p proxypool-importer --example make_sample
//! ```

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut book = rust_xlsxwriter::Workbook::new();
    let sheet = book.add_worksheet();
    let bold = rust_xlsxwriter::Format::new().set_bold();
    let header =
        ["host", "port", "area", "rotate_url", "provider", "package_code", "expired_at", "username", "password"];
    for (c, h) in header.iter().enumerate() {
        sheet.write_string_with_format(0, u16::try_from(c)?, *h, &bold)?;
    }
    let rows: [(&str, u16, &str, &str, &str); 5] = [
        ("203.0.113.10", 8080, "vn", "", ""),
        ("203.0.113.11", 8080, "vn", "", ""),
        ("203.0.113.12", 3128, "vn", "user12", "secret12"),
        ("198.51.100.20", 8000, "global", "", ""),
        ("198.51.100.21", 8000, "global", "", ""),
    ];
    for (i, (host, port, area, user, pass)) in rows.iter().enumerate() {
        let r = u32::try_from(i + 1)?;
        sheet.write_string(r, 0, *host)?;
        sheet.write_number(r, 1, f64::from(*port))?;
        sheet.write_string(r, 2, *area)?;
        sheet.write_string(r, 3, format!("http://127.0.0.1:9/rotate/{host}"))?;
        sheet.write_string(r, 4, "Demo")?;
        sheet.write_string(r, 5, "DEMO")?;
        sheet.write_string(r, 6, "2030-12-31")?;
        if !user.is_empty() {
            sheet.write_string(r, 7, *user)?;
            sheet.write_string(r, 8, *pass)?;
        }
    }
    sheet.autofit();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/sample-import.xlsx");
    book.save(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}

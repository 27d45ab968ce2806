//! PostgreSQL's own regression suite, for running it through wicket-pg: the
//! regression files of the installed server's source release (Debian's
//! orig tarball, which is PostgreSQL's release tarball) and the C test
//! modules they load, built against that server's headers.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, is_root, root};

/// Where `prepare` put things.
pub struct Regress {
    /// Holds `src/test/regress` (the input directory) and `lib` (the test modules).
    pub dir: PathBuf,
    /// The `pg_regress` binary the server package ships (under pgxs).
    pub pg_regress: PathBuf,
    /// The server's bin directory (psql for pg_regress).
    pub bindir: PathBuf,
}

fn output(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> Result<(), String> {
    let st = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .status()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd} {} failed", args.join(" ")))
    }
}

/// Makes the regression files and test modules ready (cached under
/// `target/pg-regress/VERSION`).
pub fn prepare(bindir: &Path) -> Result<Regress, String> {
    // /usr/lib/postgresql/15/bin → 15
    let major = bindir
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .ok_or("cannot tell the PostgreSQL major version")?
        .to_string();
    let version = output(
        "dpkg-query",
        &["-W", "-f=${Version}", &format!("postgresql-{major}")],
    )?;
    let upstream = version.split('-').next().unwrap_or(&version).to_string();
    let server_inc = PathBuf::from(format!("/usr/include/postgresql/{major}/server"));
    if !server_inc.join("postgres.h").exists() {
        if !is_root() {
            return Err(format!(
                "PostgreSQL server headers missing: apt-get install postgresql-server-dev-{major}={version}"
            ));
        }
        // The exact installed version, so the server itself is never upgraded.
        util::step(&format!(
            "apt-get install postgresql-server-dev-{major}={version} (to build the regression test modules)"
        ));
        util::run("apt-get", &["update", "-qq"], &[])?;
        util::run(
            "apt-get",
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                &format!("postgresql-server-dev-{major}={version}"),
            ],
            &[("DEBIAN_FRONTEND".into(), "noninteractive".into())],
        )?;
    }
    let pgxs = PathBuf::from(format!("/usr/lib/postgresql/{major}/lib/pgxs"));
    let pg_regress = pgxs.join("src/test/regress/pg_regress");
    if !pg_regress.exists() {
        return Err(format!("{} not found", pg_regress.display()));
    }
    let dir = root().join("target/pg-regress").join(&upstream);
    let ready = dir.join("ready");
    if !ready.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("lib")).map_err(|e| e.to_string())?;
        let tarball = format!("postgresql-{major}_{upstream}.orig.tar.bz2");
        util::step(&format!(
            "fetching PostgreSQL {upstream}'s regression files ({tarball})"
        ));
        let pools = [
            format!("http://deb.debian.org/debian/pool/main/p/postgresql-{major}"),
            format!("http://deb.debian.org/debian-security/pool/updates/main/p/postgresql-{major}"),
        ];
        let fetched = pools.iter().any(|pool| {
            Command::new("curl")
                .args(["-fsSL", "--retry", "3", "-o", "src.tar.bz2"])
                .arg(format!("{pool}/{tarball}"))
                .current_dir(&dir)
                .status()
                .is_ok_and(|s| s.success())
        });
        if !fetched {
            return Err(format!(
                "cannot download {tarball} from Debian's archive (tried {})",
                pools.join(", ")
            ));
        }
        run_in(
            &dir,
            "tar",
            &[
                "-xjf",
                "src.tar.bz2",
                "--strip-components=1",
                "--wildcards",
                "*/src/test/regress/*",
                "*/contrib/spi/*",
            ],
        )?;
        let _ = std::fs::remove_file(dir.join("src.tar.bz2"));
        let inc = format!("-I{}", server_inc.display());
        for (src, out, define) in [
            ("src/test/regress/regress.c", "lib/regress.so", None),
            ("contrib/spi/autoinc.c", "lib/autoinc.so", None),
            (
                "contrib/spi/refint.c",
                "lib/refint.so",
                Some("-DREFINT_VERBOSE"),
            ),
        ] {
            let mut args = vec!["-O1", "-fPIC", "-shared", &inc, "-o", out, src];
            if let Some(d) = define {
                args.push(d);
            }
            run_in(&dir, "gcc", &args)?;
        }
        std::fs::write(&ready, &version).map_err(|e| e.to_string())?;
    }
    Ok(Regress {
        dir,
        pg_regress,
        bindir: bindir.to_path_buf(),
    })
}

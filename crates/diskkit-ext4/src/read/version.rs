//! Kernel version ordering, in the spirit of `rpmvercmp` with Debian's `~` rule: runs of
//! digits compare numerically, runs of letters lexically, a digit run beats a letter run,
//! other characters only separate runs, and `~` sorts before everything, even the end.

use std::cmp::Ordering;

/// Compare two version strings.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        a = skip_separators(a);
        b = skip_separators(b);
        match (a.first() == Some(&b'~'), b.first() == Some(&b'~')) {
            (true, true) => {
                a = &a[1..];
                b = &b[1..];
                continue;
            }
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => {}
        }
        match (a.is_empty(), b.is_empty()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Less,
            (false, true) => return Ordering::Greater,
            (false, false) => {}
        }
        let a_digit = a[0].is_ascii_digit();
        let b_digit = b[0].is_ascii_digit();
        if a_digit != b_digit {
            return if a_digit {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }
        let run = |s: &[u8]| {
            s.iter()
                .position(|c| {
                    if a_digit {
                        !c.is_ascii_digit()
                    } else {
                        !c.is_ascii_alphabetic()
                    }
                })
                .unwrap_or(s.len())
        };
        let (ra, rb) = (run(a), run(b));
        let (sa, sb) = (&a[..ra], &b[..rb]);
        let ord = if a_digit {
            let ta = trim_zeros(sa);
            let tb = trim_zeros(sb);
            ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb))
        } else {
            sa.cmp(sb)
        };
        if ord != Ordering::Equal {
            return ord;
        }
        a = &a[ra..];
        b = &b[rb..];
    }
}

fn skip_separators(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .position(|&c| c.is_ascii_alphanumeric() || c == b'~')
        .unwrap_or(s.len());
    &s[n..]
}

fn trim_zeros(s: &[u8]) -> &[u8] {
    let n = s.iter().position(|&c| c != b'0').unwrap_or(s.len());
    &s[n..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_versions() {
        use Ordering::*;
        assert_eq!(
            compare_versions("6.1.0-28-cloud-amd64", "6.1.0-9-cloud-amd64"),
            Greater
        );
        assert_eq!(compare_versions("6.10.0", "6.9.12"), Greater);
        assert_eq!(
            compare_versions("6.8.5-301.fc40.x86_64", "6.8.5-301.fc40.x86_64"),
            Equal
        );
        assert_eq!(compare_versions("6.1~rc1", "6.1"), Less);
        assert_eq!(compare_versions("6.1", "6.1.1"), Less);
        assert_eq!(compare_versions("0-rescue-abc", "6.1.0"), Less);
        assert_eq!(compare_versions("5.14.0-427.el9", "5.14.0-70.el9"), Greater);
    }

    proptest! {
        #[test]
        fn antisymmetric_and_reflexive(a in "[0-9a-z.~+-]{0,12}", b in "[0-9a-z.~+-]{0,12}") {
            prop_assert_eq!(compare_versions(&a, &a), Ordering::Equal);
            prop_assert_eq!(compare_versions(&a, &b), compare_versions(&b, &a).reverse());
        }
    }
}

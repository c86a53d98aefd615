//! `[surfaces]`: which compatible surfaces (contract §12) are served; both
//! on by default.

use super::raw::RawSurfaces;

/// The compatible surfaces switches (`[surfaces]`); both on by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Surfaces {
    /// VGS Card Management Platform network tokens (`/cards/…`).
    pub vgs_cmp: bool,
    /// J.P. Morgan `POST /cryptograms`.
    pub jpmc: bool,
}

pub(super) fn validate(raw: Option<&RawSurfaces>) -> Surfaces {
    let none = RawSurfaces::default();
    let raw = raw.unwrap_or(&none);
    Surfaces {
        vgs_cmp: raw.vgs_cmp.unwrap_or(true),
        jpmc: raw.jpmc.unwrap_or(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn surfaces_default_on_switch_off_and_refuse_strangers() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.surfaces,
            Surfaces {
                vgs_cmp: true,
                jpmc: true
            }
        );
        let c = Config::parse("[surfaces]\nvgs_cmp = false\n").unwrap();
        assert!(!c.surfaces.vgs_cmp && c.surfaces.jpmc);
        let c = Config::parse("[surfaces]\njpmc = false\n").unwrap();
        assert!(c.surfaces.vgs_cmp && !c.surfaces.jpmc);
        let e = Config::parse("[surfaces]\nstripe = true\n").unwrap_err();
        assert!(e.to_string().contains("stripe"), "{e}");
        let e = Config::parse("[surfaces]\njpmc = \"yes\"\n").unwrap_err();
        assert!(e.to_string().contains("boolean"), "{e}");
    }
}

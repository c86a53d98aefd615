//! The words a placeholder is written in: the [`Namespace`]s, the
//! [`Field`]s a placeholder names and the [`Filter`]s of its `| …` chain.
//!
//! Every field is written once, as a row of the `fields!` table below: its
//! variant, its placeholder name, the namespaces it belongs to and what
//! kind of text its value is (which decides whether a raw body may hold it,
//! whether it takes a `.key`, and how long its text can be). The enum, its
//! docs, [`Field::ALL`] and every property are generated from that row.
//!
//! It must never hold or see a value: only names.

/// Which placeholder names a template may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    /// Network-token requests: `number`, `cryptogram`, `eci`, ….
    NetworkToken,
    /// PCI-token requests: `account_number`, `security_code`, ….
    PciToken,
}

/// The namespaces a field belongs to (a column of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    Both,
    NetworkToken,
    PciToken,
}

impl Scope {
    fn includes(self, ns: Namespace) -> bool {
        match self {
            Scope::Both => true,
            Scope::NetworkToken => ns == Namespace::NetworkToken,
            Scope::PciToken => ns == Namespace::PciToken,
        }
    }
}

/// What a field's value is as text (a column of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Text {
    /// A fixed alphabet (digits, base64, ids, enum names) of at most this
    /// many bytes: safe in any body.
    Fixed(usize),
    /// Text a merchant (or a token service) chose, at most this many
    /// bytes: only a known body type can escape it.
    Free(usize),
    /// A string map (free text), or one of its values with `.key`.
    Map,
}

/// Most bytes of a metadata map's compact JSON form before escaping:
/// braces, and per pair two quoted strings, a colon and a comma (limits of
/// `api::json::metadata`, four UTF-8 bytes per character).
const MAX_MAP_BYTES: usize = 2 + crate::vault::METADATA_MAX_PAIRS
    * (4 * (crate::vault::METADATA_MAX_KEY + crate::vault::METADATA_MAX_VALUE) + 6);

/// The `(network token)` in a field's doc.
macro_rules! scope_doc {
    (Both) => {
        "both namespaces"
    };
    (NetworkToken) => {
        "network token"
    };
    (PciToken) => {
        "PCI token"
    };
}

/// The ` or `name.<key>`` in a map field's doc.
macro_rules! key_doc {
    (Map, $name:literal) => {
        concat!(" or `", $name, ".<key>`")
    };
    ($other:ident, $name:literal) => {
        ""
    };
}

/// The field table: `Variant = "name", Scope, Text;` a row. Generates the
/// enum (with a doc per variant), [`Field::ALL`] in table order, and
/// `Field::row`, the one `match` every property reads.
macro_rules! fields {
    ($($variant:ident = $name:literal, $scope:ident, $text:ident $(($max:expr))?;)*) => {
        /// A value a placeholder names.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Field {
            $(
                #[doc = concat!(
                    "`", $name, "`", key_doc!($text, $name), " (", scope_doc!($scope), ")."
                )]
                $variant,
            )*
        }

        impl Field {
            /// Every field, in declaration order.
            pub const ALL: [Field; [$($name),*].len()] = [$(Field::$variant),*];

            /// The field's row: name, namespaces, kind of text.
            fn row(self) -> (&'static str, Scope, Text) {
                match self {
                    $(Field::$variant => ($name, Scope::$scope, Text::$text $(($max))?),)*
                }
            }
        }
    };
}

fields! {
    Cryptogram = "cryptogram", NetworkToken, Fixed(64);
    DynamicCvv = "dynamic_cvv", NetworkToken, Fixed(8);
    Eci = "eci", NetworkToken, Fixed(8);
    // Integers are at most 20 characters (`i64::MIN`).
    ExpiryMonth = "expiry_month", Both, Fixed(20);
    ExpiryYear = "expiry_year", Both, Fixed(20);
    Number = "number", NetworkToken, Fixed(19);
    Type = "type", NetworkToken, Fixed(16);
    Metadata = "metadata", Both, Map;
    SchemeReference = "scheme_reference", NetworkToken, Fixed(128);
    SchemeMetadata = "scheme_metadata", NetworkToken, Map;
    Status = "status", NetworkToken, Fixed(16);
    SupportsDeviceBinding = "supports_device_binding", NetworkToken, Fixed(6);
    NetworkTokenId = "network_token_id", NetworkToken, Fixed(36);
    NetworkTokenType = "network_token_type", NetworkToken, Fixed(16);
    NetworkTokenMetadata = "network_token_metadata", NetworkToken, Map;
    AccountNumber = "account_number", PciToken, Fixed(19);
    // 100 characters of up to four UTF-8 bytes.
    CardholderName = "cardholder_name", PciToken, Free(4 * 100);
    SecurityCode = "security_code", PciToken, Fixed(6);
    Bin = "bin", PciToken, Fixed(6);
    Last4 = "last4", PciToken, Fixed(6);
    PciTokenId = "pci_token_id", PciToken, Fixed(36);
}

impl Field {
    /// The placeholder name, e.g. `"dynamic_cvv"`.
    pub fn name(self) -> &'static str {
        self.row().0
    }

    /// Whether the field may be used in `ns`.
    pub fn in_namespace(self, ns: Namespace) -> bool {
        self.row().1.includes(ns)
    }

    /// Whether the value is free text a merchant (or a token service)
    /// chose, which only a known body type can escape.
    pub fn is_free_text(self) -> bool {
        matches!(self.row().2, Text::Free(_) | Text::Map)
    }

    /// Whether the field takes a `.key` (the three metadata maps).
    pub fn takes_key(self) -> bool {
        self.row().2 == Text::Map
    }

    /// Most bytes of the value's string form (a map's: its JSON form; one
    /// of its values with `keyed`).
    pub(super) fn max_text_bytes(self, keyed: bool) -> usize {
        match self.row().2 {
            Text::Fixed(max) | Text::Free(max) => max,
            Text::Map if keyed => 4 * crate::vault::METADATA_MAX_VALUE,
            Text::Map => MAX_MAP_BYTES,
        }
    }

    /// The field named `name` in `ns`, if any.
    pub fn from_name(name: &[u8], ns: Namespace) -> Option<Field> {
        Field::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == name && f.in_namespace(ns))
    }
}

/// A filter in a placeholder's `| …` chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Filter {
    /// Write the native JSON value (number, `true`, `null`, object, or a
    /// quoted string).
    Unwrap,
    /// A month `1..=12` as two digits.
    Mm,
    /// A year of two or more digits as its last two.
    Yy,
    /// A two-digit year as `20YY`.
    Yyyy,
    /// The last four characters.
    Last4,
    /// The first six characters.
    First6,
}

impl Filter {
    /// Every filter.
    pub const ALL: [Filter; 6] = [
        Filter::Unwrap,
        Filter::Mm,
        Filter::Yy,
        Filter::Yyyy,
        Filter::Last4,
        Filter::First6,
    ];

    /// The filter's name as written in a template.
    pub fn name(self) -> &'static str {
        match self {
            Filter::Unwrap => "unwrap",
            Filter::Mm => "mm",
            Filter::Yy => "yy",
            Filter::Yyyy => "yyyy",
            Filter::Last4 => "last4",
            Filter::First6 => "first6",
        }
    }

    /// The filter named `name`, if any.
    pub fn from_name(name: &[u8]) -> Option<Filter> {
        Filter::ALL
            .into_iter()
            .find(|f| f.name().as_bytes() == name)
    }
}

//! TEMPORARY interface placeholder; replaced by the real scanner.
#![allow(missing_docs, dead_code, unused_variables)]
use std::collections::BTreeMap;
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax { Angle, Braces }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context { Json, Form, Xml, Raw, Header, UrlPath, UrlQuery }
impl Context { pub fn for_content_type(ct: Option<&[u8]>) -> Context { Context::Raw } }
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Namespace { NetworkToken, PciToken }
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field { Cryptogram, DynamicCvv, Eci, ExpiryMonth, ExpiryYear, Number, Type, Metadata, SchemeReference,
    SchemeMetadata, Status, SupportsDeviceBinding, NetworkTokenId, NetworkTokenType, NetworkTokenMetadata,
    AccountNumber, CardholderName, SecurityCode, Bin, Last4, PciTokenId }
pub enum Value<'a> { Str(&'a str), Int(i64), Bool(bool), Null, Map(&'a BTreeMap<String, String>) }
pub trait Values { fn get(&self, field: Field, key: Option<&str>) -> Value<'_>; }
#[derive(Debug)]
pub struct TemplateError;
impl std::fmt::Display for TemplateError { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.write_str("x") } }
pub struct Template;
pub struct Placeholder { pub field: Field }
impl Template {
    pub fn parse(input: &[u8], syntax: Syntax, ctx: Context, ns: Namespace) -> Result<Template, TemplateError> { Err(TemplateError) }
    pub fn is_static(&self) -> bool { true }
    pub fn placeholders(&self) -> impl Iterator<Item = &Placeholder> { std::iter::empty() }
    pub fn render_to_vec(&self, input: &[u8], values: &dyn Values) -> Vec<u8> { input.to_vec() }
}

//! FHIR R4 element definitions: types and cardinality of every element (used by FHIRPath).
//!
//! The data is `data/fhir/elements-r4.json`, compiled into the binary and parsed once on first
//! use. Backbone elements are flattened inside their owning type as dotted paths
//! (`Patient.contact.name` is the element `contact.name` of `Patient`), so an element is always
//! addressed by an *owner* type plus a dotted *path*.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;

static RAW: &str = include_str!("../../data/fhir/elements-r4.json");

/// The kind of a FHIR type definition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A resource (`Patient`, `Resource`, `DomainResource`, ...).
    Resource,
    /// A complex data type (`HumanName`, `Quantity`, `BackboneElement`, ...).
    ComplexType,
    /// A primitive data type (`string`, `date`, `code`, ...).
    PrimitiveType,
}

/// One element of a type: its allowed types and whether it repeats.
#[derive(Debug, Clone)]
pub struct ElementDef {
    /// Allowed type codes (`HumanName`, `dateTime`, `BackboneElement`, `#Questionnaire.item`,
    /// or `http://hl7.org/fhirpath/System.String` for the system-typed `id`/`value` elements).
    pub types: Vec<String>,
    /// `true` when `max` is `*` (or greater than one).
    pub repeats: bool,
    /// `true` for choice elements (`value[x]`); the JSON property is then `value` + type name.
    pub choice: bool,
}

/// One type definition.
#[derive(Debug, Clone)]
pub struct TypeDef {
    /// The type's name, as in the specification.
    pub name: String,
    /// Resource, complex or primitive type.
    pub kind: Kind,
    /// The base type name (`DomainResource` for `Patient`), `None` at the root of the hierarchy.
    pub base: Option<String>,
    /// Elements keyed by dotted path without the `[x]` suffix (`value` for `value[x]`).
    pub elements: HashMap<String, ElementDef>,
}

/// All type definitions of FHIR R4.
#[derive(Debug)]
pub struct Model {
    types: HashMap<String, TypeDef>,
}

#[derive(Deserialize)]
struct RawFile {
    types: HashMap<String, RawType>,
}

#[derive(Deserialize)]
struct RawType {
    kind: Kind,
    #[serde(default)]
    base: Option<String>,
    elements: HashMap<String, RawElement>,
}

#[derive(Deserialize)]
struct RawElement {
    types: Vec<String>,
    max: String,
}

static MODEL: LazyLock<Model> = LazyLock::new(|| {
    // The file is part of the crate; a parse failure is a build defect caught by the tests.
    let raw: RawFile = serde_json::from_str(RAW).expect("data/fhir/elements-r4.json is valid");
    let types = raw
        .types
        .into_iter()
        .map(|(name, t)| {
            let elements = t
                .elements
                .into_iter()
                .map(|(path, e)| {
                    let choice = path.ends_with("[x]");
                    let key = path.trim_end_matches("[x]").to_string();
                    let repeats = e.max != "1" && e.max != "0";
                    (
                        key,
                        ElementDef {
                            types: e.types,
                            repeats,
                            choice,
                        },
                    )
                })
                .collect();
            let base = t.base.filter(|b| !b.is_empty());
            (
                name.clone(),
                TypeDef {
                    name,
                    kind: t.kind,
                    base,
                    elements,
                },
            )
        })
        .collect();
    Model { types }
});

/// The FHIR R4 model, parsed on first use.
pub fn model() -> &'static Model {
    &MODEL
}

impl Model {
    /// The definition of a type by name (`Patient`, `HumanName`, `string`).
    pub fn get(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    /// The definition of `name` with its interned (`'static`) name.
    pub fn type_def(&'static self, name: &str) -> Option<&'static TypeDef> {
        self.types.get(name)
    }

    /// Whether `ty` is `ancestor` or derives from it (`Patient` derives from `Resource`,
    /// `code` from `string`, `Age` from `Quantity`).
    pub fn is_subtype(&self, ty: &str, ancestor: &str) -> bool {
        let mut cur = Some(ty);
        // The hierarchy is a handful of levels deep; the bound only guards against a cycle.
        for _ in 0..16 {
            match cur {
                Some(t) if t == ancestor => return true,
                Some(t) => cur = self.types.get(t).and_then(|d| d.base.as_deref()),
                None => return false,
            }
        }
        false
    }

    /// Look up the element `path` of type `owner`, walking up the base types; backbone
    /// paths (containing a dot) fall back to `BackboneElement`'s own elements (`id`,
    /// `extension`, `modifierExtension`) which the flattened data does not repeat.
    pub fn element(
        &'static self,
        owner: &str,
        path: &str,
    ) -> Option<(&'static str, &'static ElementDef)> {
        let mut cur = Some(owner);
        for _ in 0..16 {
            let def = self.types.get(cur?)?;
            if let Some((k, e)) = def.elements.get_key_value(path) {
                return Some((k.as_str(), e));
            }
            cur = def.base.as_deref();
        }
        None
    }

    /// Whether a type named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.types.contains_key(name)
    }

    /// The interned name of type `name`.
    pub fn intern(&'static self, name: &str) -> Option<&'static str> {
        self.types.get_key_value(name).map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_and_navigates() {
        let m = model();
        assert_eq!(m.get("Patient").unwrap().kind, Kind::Resource);
        assert!(m.is_subtype("Patient", "Resource"));
        assert!(m.is_subtype("code", "string"));
        let (_, e) = m.element("Observation", "value").unwrap();
        assert!(e.choice);
        let (_, e) = m.element("Patient", "contact.name").unwrap();
        assert_eq!(e.types, vec!["HumanName".to_string()]);
        assert!(m.element("Patient", "id").is_some());
    }
}

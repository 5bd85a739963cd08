//! FHIR search criteria: parsing a Subscription criteria string and matching it against a resource.

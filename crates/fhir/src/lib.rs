//! FHIR R4 protocol code of hms-edge, with no I/O, no SQL and no async runtime: the search
//! parameters of R4 ([`params`]), the FHIRPath subset that extracts them ([`fhirpath`]), index
//! extraction ([`index`]), FHIR dates ([`date`]), search parsing ([`search`]) and resource checks
//! ([`resource`]), and SMART on FHIR bearer tokens and scopes ([`auth`]).
//!
//! Invariant: every function here takes untrusted text and returns a value or an [`Invalid`],
//! never a panic; the property tests in `fuzz_tests` and the cargo-fuzz
//! targets in `daemon/fuzz` hold it to that.

pub mod auth;
pub mod date;
pub mod fhirpath;
#[cfg(test)]
mod fuzz_tests;
pub mod index;
pub mod params;
#[rustfmt::skip]
pub mod params_r4;
pub mod resource;
pub mod search;

/// Why a request's FHIR content was refused: the daemon answers 400 or 422 with an
/// OperationOutcome holding the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Malformed: bad JSON, syntax or an unknown parameter (400).
    #[error("{0}")]
    BadRequest(String),
    /// Well-formed but not processable (422).
    #[error("{0}")]
    Unprocessable(String),
}

impl Invalid {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Invalid::BadRequest(_) => 400,
            Invalid::Unprocessable(_) => 422,
        }
    }
}

/// Resource types this server stores and reads (R4). Types with a search index are those in
/// [`params::indexed_types`]; others may be stored and read by id, and searching them is refused.
pub const R4_RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Types clients may not write (the server writes them).
pub const READ_ONLY_TYPES: &[&str] = &["AuditEvent"];

/// Whether `t` is an R4 resource type.
pub fn is_resource_type(t: &str) -> bool {
    R4_RESOURCE_TYPES.binary_search(&t).is_ok()
}

/// FHIR id syntax: 1-64 of `A-Z a-z 0-9 - .`.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// The ImagingStudy id of a study: its UID when that is a valid FHIR id (UIDs are digits and
/// dots, at most 64 characters), else a hash of it.
pub fn imaging_study_id(uid: &str) -> String {
    if valid_id(uid) {
        uid.to_owned()
    } else {
        use sha2::Digest;
        format!("dcm-{}", &hex::encode(sha2::Sha256::digest(uid.as_bytes()))[..40])
    }
}

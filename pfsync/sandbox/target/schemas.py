"""The schema tables of the target sandbox's validator (pfsync.sandbox.target.validate): Medplum's
primitive regexes, which elements each common datatype and resource has and of which type
(docs/medplum.md "Validation"), parsed once into SCHEMAS.

May import: nothing of pfsync.
"""

from __future__ import annotations

import re

# Medplum's validationRegexes (core 5.x).
_YEAR = r"(\d(\d(\d[1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TZ = r"(Z|[+-]((0\d|1[0-3]):[0-5]\d|14:00))"
REGEXES: dict[str, re.Pattern[str]] = {
    "base64Binary": re.compile(r"^([A-Za-z\d+/]{4})*([A-Za-z\d+/]{2}==|[A-Za-z\d+/]{3}=)?$"),
    "canonical": re.compile(r"^\S*$"),
    "code": re.compile(r"^[^\s]+( [^\s]+)*$"),
    "date": re.compile(rf"^{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2]\d|3[0-1]))?)?$"),
    "dateTime": re.compile(
        rf"^{_YEAR}(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2]\d|3[0-1])(T([01]\d|2[0-3])"
        rf"(:[0-5]\d:([0-5]\d|60)(\.\d{{1,9}})?)?)?)?{_TZ}?)?$"
    ),
    "id": re.compile(r"^[A-Za-z0-9\-.]{1,64}$"),
    "instant": re.compile(
        rf"^{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[1-2]\d|3[0-1])T([01]\d|2[0-3]):[0-5]\d:"
        rf"([0-5]\d|60)(\.\d{{1,9}})?{_TZ}$"
    ),
    "oid": re.compile(r"^urn:oid:[0-2](\.(0|[1-9]\d*))+$"),
    "time": re.compile(r"^([01]\d|2[0-3]):[0-5]\d:([0-5]\d|60)(\.\d{1,9})?$"),
    "uri": re.compile(r"^\S*$"),
    "url": re.compile(r"^\S*$"),
    "uuid": re.compile(r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
}
STRING_TYPES = {
    "base64Binary",
    "canonical",
    "code",
    "date",
    "dateTime",
    "id",
    "instant",
    "markdown",
    "oid",
    "string",
    "time",
    "uri",
    "url",
    "uuid",
    "xhtml",
}
NUMBER_TYPES = {"decimal", "integer", "positiveInt", "unsignedInt"}
PRIMITIVES = STRING_TYPES | NUMBER_TYPES | {"boolean"}
ANY = "*"  # element not checked below this point (backbone elements, Medplum-internal meta)

# name:Type, "*" suffix = array, "[x]" = choice (types separated by |, "*" = any type).
_DATATYPES = {
    "Meta": "versionId:id lastUpdated:instant source:uri profile:canonical* security:Coding* tag:Coding* "
    "author:* project:* compartment:* account:* accounts:* onBehalfOf:*",
    "Narrative": "status:code div:xhtml",
    "Identifier": "use:code type:CodeableConcept system:uri value:string period:Period assigner:Reference",
    "HumanName": "use:code text:string family:string given:string* prefix:string* suffix:string* period:Period",
    "ContactPoint": "system:code value:string use:code rank:positiveInt period:Period",
    "Address": "use:code type:code text:string line:string* city:string district:string state:string "
    "postalCode:string country:string period:Period",
    "CodeableConcept": "coding:Coding* text:string",
    "Coding": "system:uri version:string code:code display:string userSelected:boolean",
    "Reference": "reference:string type:uri identifier:Identifier display:string",
    "Period": "start:dateTime end:dateTime",
    "Quantity": "value:decimal comparator:code unit:string system:uri code:code",
    "Money": "value:decimal currency:code",
    "Range": "low:Quantity high:Quantity",
    "Ratio": "numerator:Quantity denominator:Quantity",
    "Attachment": "contentType:code language:code data:base64Binary url:url size:unsignedInt hash:base64Binary "
    "title:string creation:dateTime",
    "Annotation": "author[x]:Reference|string time:dateTime text:markdown",
    "Extension": "url:uri value[x]:*",
    "DocumentReferenceContent": "modifierExtension:Extension* attachment:Attachment format:Coding",
}
ALIASES = {
    "Duration": "Quantity",
    "Age": "Quantity",
    "Count": "Quantity",
    "Distance": "Quantity",
    "SimpleQuantity": "Quantity",
    "MoneyQuantity": "Quantity",
}
LENIENT = {
    "BackboneElement",
    "Dosage",
    "Timing",
    "SampledData",
    "Signature",
    "ContactDetail",
    "Expression",
    "UsageContext",
    "RelatedArtifact",
    "DataRequirement",
    "ParameterDefinition",
    "TriggerDefinition",
    "Contributor",
    "Element",
}

_RESOURCE = "id:id meta:Meta implicitRules:uri language:code"
_DOMAIN = _RESOURCE + " text:Narrative contained:Resource* extension:Extension* modifierExtension:Extension*"
_B = "BackboneElement"
_RESOURCES = {
    "Patient": f"identifier:Identifier* active:boolean name:HumanName* telecom:ContactPoint* gender:code "
    f"birthDate:date deceased[x]:boolean|dateTime address:Address* maritalStatus:CodeableConcept "
    f"multipleBirth[x]:boolean|integer photo:Attachment* contact:{_B}* communication:{_B}* "
    f"generalPractitioner:Reference* managingOrganization:Reference link:{_B}*",
    "Encounter": f"identifier:Identifier* status:code statusHistory:{_B}* class:Coding classHistory:{_B}* "
    f"type:CodeableConcept* serviceType:CodeableConcept priority:CodeableConcept subject:Reference "
    f"episodeOfCare:Reference* basedOn:Reference* participant:{_B}* appointment:Reference* "
    f"period:Period length:Duration reasonCode:CodeableConcept* reasonReference:Reference* "
    f"diagnosis:{_B}* account:Reference* hospitalization:{_B} location:{_B}* "
    f"serviceProvider:Reference partOf:Reference",
    "Condition": f"identifier:Identifier* clinicalStatus:CodeableConcept verificationStatus:CodeableConcept "
    f"category:CodeableConcept* severity:CodeableConcept code:CodeableConcept "
    f"bodySite:CodeableConcept* subject:Reference encounter:Reference "
    f"onset[x]:dateTime|Age|Period|Range|string abatement[x]:dateTime|Age|Period|Range|string "
    f"recordedDate:dateTime recorder:Reference asserter:Reference stage:{_B}* evidence:{_B}* "
    f"note:Annotation*",
    "Observation": f"identifier:Identifier* basedOn:Reference* partOf:Reference* status:code "
    f"category:CodeableConcept* code:CodeableConcept subject:Reference focus:Reference* "
    f"encounter:Reference effective[x]:dateTime|Period|Timing|instant issued:instant "
    f"performer:Reference* value[x]:Quantity|CodeableConcept|string|boolean|integer|Range|Ratio|"
    f"SampledData|time|dateTime|Period dataAbsentReason:CodeableConcept "
    f"interpretation:CodeableConcept* note:Annotation* bodySite:CodeableConcept "
    f"method:CodeableConcept specimen:Reference device:Reference referenceRange:{_B}* "
    f"hasMember:Reference* derivedFrom:Reference* component:{_B}*",
    "Procedure": f"identifier:Identifier* instantiatesCanonical:canonical* instantiatesUri:uri* "
    f"basedOn:Reference* partOf:Reference* status:code statusReason:CodeableConcept "
    f"category:CodeableConcept code:CodeableConcept subject:Reference encounter:Reference "
    f"performed[x]:dateTime|Period|string|Age|Range recorder:Reference asserter:Reference "
    f"performer:{_B}* location:Reference reasonCode:CodeableConcept* reasonReference:Reference* "
    f"bodySite:CodeableConcept* outcome:CodeableConcept report:Reference* "
    f"complication:CodeableConcept* complicationDetail:Reference* followUp:CodeableConcept* "
    f"note:Annotation* focalDevice:{_B}* usedReference:Reference* usedCode:CodeableConcept*",
    "MedicationRequest": f"identifier:Identifier* status:code statusReason:CodeableConcept intent:code "
    f"category:CodeableConcept* priority:code doNotPerform:boolean "
    f"reported[x]:boolean|Reference medication[x]:CodeableConcept|Reference "
    f"subject:Reference encounter:Reference supportingInformation:Reference* "
    f"authoredOn:dateTime requester:Reference performer:Reference "
    f"performerType:CodeableConcept recorder:Reference reasonCode:CodeableConcept* "
    f"reasonReference:Reference* instantiatesCanonical:canonical* instantiatesUri:uri* "
    f"basedOn:Reference* groupIdentifier:Identifier courseOfTherapyType:CodeableConcept "
    f"insurance:Reference* note:Annotation* dosageInstruction:Dosage* "
    f"dispenseRequest:{_B} substitution:{_B} priorPrescription:Reference "
    f"detectedIssue:Reference* eventHistory:Reference*",
    "MedicationStatement": "identifier:Identifier* basedOn:Reference* partOf:Reference* status:code "
    "statusReason:CodeableConcept* category:CodeableConcept "
    "medication[x]:CodeableConcept|Reference subject:Reference context:Reference "
    "effective[x]:dateTime|Period dateAsserted:dateTime informationSource:Reference "
    "derivedFrom:Reference* reasonCode:CodeableConcept* reasonReference:Reference* "
    "note:Annotation* dosage:Dosage*",
    "Immunization": f"identifier:Identifier* status:code statusReason:CodeableConcept "
    f"vaccineCode:CodeableConcept patient:Reference encounter:Reference "
    f"occurrence[x]:dateTime|string recorded:dateTime primarySource:boolean "
    f"reportOrigin:CodeableConcept location:Reference manufacturer:Reference lotNumber:string "
    f"expirationDate:date site:CodeableConcept route:CodeableConcept doseQuantity:Quantity "
    f"performer:{_B}* note:Annotation* reasonCode:CodeableConcept* reasonReference:Reference* "
    f"isSubpotent:boolean subpotentReason:CodeableConcept* education:{_B}* "
    f"programEligibility:CodeableConcept* fundingSource:CodeableConcept reaction:{_B}* "
    f"protocolApplied:{_B}*",
    "DiagnosticReport": f"identifier:Identifier* basedOn:Reference* status:code category:CodeableConcept* "
    f"code:CodeableConcept subject:Reference encounter:Reference "
    f"effective[x]:dateTime|Period issued:instant performer:Reference* "
    f"resultsInterpreter:Reference* specimen:Reference* result:Reference* "
    f"imagingStudy:Reference* media:{_B}* conclusion:string "
    f"conclusionCode:CodeableConcept* presentedForm:Attachment*",
    "DocumentReference": f"masterIdentifier:Identifier identifier:Identifier* status:code docStatus:code "
    f"type:CodeableConcept category:CodeableConcept* subject:Reference date:instant "
    f"author:Reference* authenticator:Reference custodian:Reference relatesTo:{_B}* "
    f"description:string securityLabel:CodeableConcept* content:DocumentReferenceContent* "
    f"context:{_B}",
    "CarePlan": f"identifier:Identifier* instantiatesCanonical:canonical* instantiatesUri:uri* "
    f"basedOn:Reference* replaces:Reference* partOf:Reference* status:code intent:code "
    f"category:CodeableConcept* title:string description:string subject:Reference "
    f"encounter:Reference period:Period created:dateTime author:Reference contributor:Reference* "
    f"careTeam:Reference* addresses:Reference* supportingInfo:Reference* goal:Reference* "
    f"activity:{_B}* note:Annotation*",
    "CareTeam": f"identifier:Identifier* status:code category:CodeableConcept* name:string subject:Reference "
    f"encounter:Reference period:Period participant:{_B}* reasonCode:CodeableConcept* "
    f"reasonReference:Reference* managingOrganization:Reference* telecom:ContactPoint* "
    f"note:Annotation*",
    "Claim": f"identifier:Identifier* status:code type:CodeableConcept subType:CodeableConcept use:code "
    f"patient:Reference billablePeriod:Period created:dateTime enterer:Reference insurer:Reference "
    f"provider:Reference priority:CodeableConcept fundsReserve:CodeableConcept related:{_B}* "
    f"prescription:Reference originalPrescription:Reference payee:{_B} referral:Reference "
    f"facility:Reference careTeam:{_B}* supportingInfo:{_B}* diagnosis:{_B}* procedure:{_B}* "
    f"insurance:{_B}* accident:{_B} item:{_B}* total:Money",
    "ExplanationOfBenefit": f"identifier:Identifier* status:code type:CodeableConcept subType:CodeableConcept "
    f"use:code patient:Reference billablePeriod:Period created:dateTime "
    f"enterer:Reference insurer:Reference provider:Reference priority:CodeableConcept "
    f"fundsReserveRequested:CodeableConcept fundsReserve:CodeableConcept "
    f"related:{_B}* prescription:Reference originalPrescription:Reference payee:{_B} "
    f"referral:Reference facility:Reference claim:Reference claimResponse:Reference "
    f"outcome:code disposition:string preAuthRef:string* preAuthRefPeriod:Period* "
    f"careTeam:{_B}* supportingInfo:{_B}* diagnosis:{_B}* procedure:{_B}* "
    f"precedence:positiveInt insurance:{_B}* accident:{_B} item:{_B}* addItem:{_B}* "
    f"adjudication:{_B}* total:{_B}* payment:{_B} formCode:CodeableConcept "
    f"form:Attachment processNote:{_B}* benefitPeriod:Period benefitBalance:{_B}*",
    "Organization": f"identifier:Identifier* active:boolean type:CodeableConcept* name:string alias:string* "
    f"telecom:ContactPoint* address:Address* partOf:Reference contact:{_B}* endpoint:Reference*",
    "Practitioner": f"identifier:Identifier* active:boolean name:HumanName* telecom:ContactPoint* "
    f"address:Address* gender:code birthDate:date photo:Attachment* qualification:{_B}* "
    f"communication:CodeableConcept*",
    "Location": f"identifier:Identifier* status:code operationalStatus:Coding name:string alias:string* "
    f"description:string mode:code type:CodeableConcept* telecom:ContactPoint* address:Address "
    f"physicalType:CodeableConcept position:{_B} managingOrganization:Reference partOf:Reference "
    f"hoursOfOperation:{_B}* availabilityExceptions:string endpoint:Reference*",
    "AllergyIntolerance": f"identifier:Identifier* clinicalStatus:CodeableConcept "
    f"verificationStatus:CodeableConcept type:code category:code* criticality:code "
    f"code:CodeableConcept patient:Reference encounter:Reference "
    f"onset[x]:dateTime|Age|Period|Range|string recordedDate:dateTime recorder:Reference "
    f"asserter:Reference lastOccurrence:dateTime note:Annotation* reaction:{_B}*",
    "Device": f"identifier:Identifier* definition:Reference udiCarrier:{_B}* status:code "
    f"statusReason:CodeableConcept* distinctIdentifier:string manufacturer:string "
    f"manufactureDate:dateTime expirationDate:dateTime lotNumber:string serialNumber:string "
    f"deviceName:{_B}* modelNumber:string partNumber:string type:CodeableConcept specialization:{_B}* "
    f"version:{_B}* property:{_B}* patient:Reference owner:Reference contact:ContactPoint* "
    f"location:Reference url:uri note:Annotation* safety:CodeableConcept* parent:Reference",
    "ImagingStudy": f"identifier:Identifier* status:code modality:Coding* subject:Reference encounter:Reference "
    f"started:dateTime basedOn:Reference* referrer:Reference interpreter:Reference* "
    f"endpoint:Reference* numberOfSeries:unsignedInt numberOfInstances:unsignedInt "
    f"procedureReference:Reference procedureCode:CodeableConcept* location:Reference "
    f"reasonCode:CodeableConcept* reasonReference:Reference* note:Annotation* "
    f"description:string series:{_B}*",
    "Group": f"identifier:Identifier* active:boolean type:code actual:boolean code:CodeableConcept name:string "
    f"quantity:unsignedInt managingEntity:Reference characteristic:{_B}* member:{_B}*",
    "Medication": f"identifier:Identifier* code:CodeableConcept status:code manufacturer:Reference "
    f"form:CodeableConcept amount:Ratio ingredient:{_B}* batch:{_B}",
    "Basic": "identifier:Identifier* code:CodeableConcept subject:Reference created:date author:Reference",
    "ServiceRequest": "identifier:Identifier* instantiatesCanonical:canonical* instantiatesUri:uri* "
    "basedOn:Reference* replaces:Reference* requisition:Identifier status:code intent:code "
    "category:CodeableConcept* priority:code doNotPerform:boolean code:CodeableConcept "
    "orderDetail:CodeableConcept* quantity[x]:Quantity|Ratio|Range subject:Reference "
    "encounter:Reference occurrence[x]:dateTime|Period|Timing "
    "asNeeded[x]:boolean|CodeableConcept authoredOn:dateTime requester:Reference "
    "performerType:CodeableConcept performer:Reference* locationCode:CodeableConcept* "
    "locationReference:Reference* reasonCode:CodeableConcept* reasonReference:Reference* "
    "insurance:Reference* supportingInfo:Reference* specimen:Reference* "
    "bodySite:CodeableConcept* note:Annotation* patientInstruction:string "
    "relevantHistory:Reference*",
}
# Resources that are not DomainResources (no text/contained/extension).
_PLAIN_RESOURCES = {
    "Binary": "contentType:code securityContext:Reference data:base64Binary url:uri",
    "Parameters": f"parameter:{_B}*",
}


class Element:
    """One element of a schema: its name, type (or "choice" with `choices`), and whether an array."""

    __slots__ = ("choices", "many", "name", "type")

    def __init__(self, name: str, type_: str, many: bool, choices: tuple[str, ...] = ()) -> None:
        self.name, self.type, self.many, self.choices = name, type_, many, choices


def _parse(spec: str, base: str) -> dict[str, Element]:
    out: dict[str, Element] = {}
    for item in (base + " " + spec).split():
        name, type_ = item.split(":", 1)
        many = type_.endswith("*") and type_ != "*"
        type_ = type_[:-1] if many else type_
        if name.endswith("[x]"):
            out[name] = Element(name[:-3], "choice", many, tuple(type_.split("|")))
        else:
            out[name] = Element(name, type_, many)
    return out


SCHEMAS: dict[str, dict[str, Element]] = {}
for _n, _s in _DATATYPES.items():
    SCHEMAS[_n] = _parse(_s, "id:string extension:Extension*")
for _n, _s in _RESOURCES.items():
    SCHEMAS[_n] = _parse(_s, _DOMAIN)
for _n, _s in _PLAIN_RESOURCES.items():
    SCHEMAS[_n] = _parse(_s, _RESOURCE)
GENERIC_RESOURCE = _parse("", _DOMAIN)
RESOURCE_TYPES = frozenset(_RESOURCES) | frozenset(_PLAIN_RESOURCES)
CHOICE_SUFFIXES = {t[0].upper() + t[1:]: t for t in (PRIMITIVES | set(SCHEMAS) | set(ALIASES) | LENIENT)}

// Reads a TID 1500 SR with dcmjs and walks it as OHIF's cornerstone-dicom-sr extension does:
// naturalised data set, Imaging Measurements > Measurement Group, and for every NUM of a group
// without an SCOORD the NUM's own ContentSequence. Prints one JSON object per group.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

const asArray = (value) => (value === undefined ? [] : Array.isArray(value) ? value : [value]);
const code = (item) => asArray(item.ConceptNameCodeSequence)[0]?.CodeValue;

const path = process.argv[2];
const bytes = readFileSync(path);
const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
const dataset = DicomMetaDictionary.naturalizeDataset(DicomMessage.readFile(buffer).dict);

const root = asArray(dataset.ContentSequence);
const measurements = root.find((item) => code(item) === "126010");
if (!measurements) throw new Error("no Imaging Measurements container");
const groups = asArray(measurements.ContentSequence).filter((item) => code(item) === "125007");

const out = groups.map((group) => {
  const items = asArray(group.ContentSequence);
  const hasScoord = items.some((item) => item.ValueType === "SCOORD" || item.ValueType === "SCOORD3D");
  const finding = items.find((item) => code(item) === "121071");
  const evaluation = items.find((item) => item.ValueType === "CODE" && code(item) === "72704001");
  const certainty = items.find((item) => item.ValueType === "NUM" && code(item) === "111012");
  const scoord = items.find((item) => item.ValueType === "SCOORD");
  const sources = [];
  for (const num of items.filter((item) => item.ValueType === "NUM")) {
    if (!hasScoord) {
      // What cornerstone-dicom-sr does for a group without SCOORD: it reads the NUM's ContentSequence.
      const { ContentSequence } = num;
      const { ValueType } = ContentSequence;
      if (!ValueType) throw new Error("NUM content without a value type");
    }
    for (const child of asArray(num.ContentSequence)) {
      const ref = asArray(child.ReferencedSOPSequence)[0];
      sources.push({
        value_type: child.ValueType,
        image: ref?.ReferencedSOPInstanceUID ?? null,
        presentation_state: asArray(ref?.ReferencedSOPSequence)[0]?.ReferencedSOPInstanceUID ?? null,
      });
    }
  }
  return {
    finding: asArray(finding?.ConceptCodeSequence)[0]?.CodeMeaning ?? null,
    evaluation: asArray(evaluation?.ConceptCodeSequence)[0]?.CodeMeaning ?? null,
    probability: certainty ? Number(asArray(certainty.MeasuredValueSequence)[0].NumericValue) : null,
    region: scoord ? asArray(scoord.GraphicData).map(Number) : null,
    sources,
  };
});
process.stdout.write(JSON.stringify(out) + "\n");

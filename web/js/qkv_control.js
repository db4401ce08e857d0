// QKV Control frontend extension: colours and a badge per method, sensible default sizes,
// and room for the mask / attention-map previews that some nodes send back as UI images.
//
// The pack's nodes are recognised by their category root ("QKV Control/<method>"), not by
// the folder the pack was cloned into, so the extension works under any install name.
import { app } from "../../../scripts/app.js";

const EXTENSION_NAME = "qkv_control.appearance";
const CATEGORY_ROOT = "QKV Control";

// Known methods (matched on the lower-cased method segment of the category). Colours are
// dark enough for white title text on the default dark palette and stay apart from the
// core node colours.
const METHOD_STYLES = [
  { match: ["indetail"], badge: "InDetail-IP", color: "#1f4e79", bgcolor: "#173650" },
  { match: ["mca"], badge: "MCA-Ctrl", color: "#2e6b3a", bgcolor: "#1f4627" },
  { match: ["deadiff"], badge: "DEADiff", color: "#5b3a7a", bgcolor: "#3c2752" },
  { match: ["ip-adapter", "ipadapter", "condition", "mask guid"], badge: "IP-Adapter", color: "#7a4b1f", bgcolor: "#513215" },
  { match: ["inversion"], badge: "Inversion", color: "#1f6b6b", bgcolor: "#154747" },
  { match: ["localization", "grounding", "segment", "sam"], badge: "Masks", color: "#6b5b1f", bgcolor: "#473c15" },
  { match: ["guidance", "cfg"], badge: "Guidance", color: "#6b1f4a", bgcolor: "#471531" },
  { match: ["tiny", "test"], badge: "Tiny", color: "#4a4a4a", bgcolor: "#333333" },
];

// Minimum sizes: wide enough that the long enum widgets (modes, block specs) stay readable,
// and tall enough that a preview image is not a thumbnail.
const MIN_WIDTH = 300;
const PREVIEW_MIN_HEIGHT = 300;

/** The method segment of a pack node's category ("QKV Control/MCA-Ctrl/masks" -> "MCA-Ctrl"), else null. */
export function methodOf(nodeData) {
  const category = String(nodeData?.category ?? "");
  const parts = category.split("/").map((part) => part.trim());
  if (parts[0] !== CATEGORY_ROOT) return null;
  return parts[1] || "General";
}

function hashHue(text) {
  let hash = 0;
  for (const ch of text) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
  return hash % 360;
}

/** Title colour, body colour and badge text for a method; unknown methods get a stable hue. */
export function styleFor(method) {
  const key = method.toLowerCase();
  const known = METHOD_STYLES.find((style) => style.match.some((m) => key.includes(m)));
  if (known) return known;
  const hue = hashHue(key);
  return { badge: method, color: `hsl(${hue}, 45%, 30%)`, bgcolor: `hsl(${hue}, 40%, 20%)` };
}

function outputTypes(nodeData) {
  return (nodeData?.output ?? []).map((type) => String(type));
}

/** Nodes whose result people would rather look at: masks and attention maps. */
function makesPreview(nodeData) {
  const name = `${nodeData?.name ?? ""} ${nodeData?.display_name ?? ""}`.toLowerCase();
  return outputTypes(nodeData).includes("MASK") || /\b(map|maps|mask|masks|preview)\b/.test(name);
}

function addBadge(node, style) {
  const Badge = window.LGraphBadge;
  if (!Badge || !Array.isArray(node.badges)) return;
  if (node.badges.some((badge) => badge?.qkvMethodBadge)) return;
  const badge = new Badge({ text: style.badge, fgColor: "#ffffff", bgColor: style.color });
  badge.qkvMethodBadge = true;
  node.badges.push(badge);
}

function growTo(node, width, height) {
  if (!Array.isArray(node.size) || typeof node.setSize !== "function") return;
  const [w, h] = node.size;
  if (w >= width && h >= height) return;
  node.setSize([Math.max(w, width), Math.max(h, height)]);
}

app.registerExtension({
  name: EXTENSION_NAME,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const method = methodOf(nodeData);
    if (method === null) return;
    const style = styleFor(method);
    const preview = makesPreview(nodeData);

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      // Saved workflows carry their own colours and sizes; configure() applies them after this.
      this.color = style.color;
      this.bgcolor = style.bgcolor;
      addBadge(this, style);
      return result;
    };

    // Default size of a new node (saved workflows keep their own).
    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize.apply(this, arguments);
      size[0] = Math.max(size[0], MIN_WIDTH);
      return size;
    };

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      // The core frontend draws message.images under the widgets; give them room.
      if (preview && Array.isArray(message?.images) && message.images.length) {
        growTo(this, MIN_WIDTH, PREVIEW_MIN_HEIGHT);
        this.setDirtyCanvas?.(true, true);
      }
      return result;
    };
  },
});

// QKV Control frontend extension: the reference K/V bank's budget as a ComfyUI setting.
//
// The frontend stores it in the user's comfy.settings.json (ComfyUI's app/app_settings.py); the
// server reads it there when a sampling run starts (inversion/kv_bank.py, SETTING_BUDGET), so it
// applies to prompts queued through the HTTP API too. Precedence: the QKV Reference K/V Bank node's
// budget_mb (non-zero) > this setting (non-zero) > $QKV_KV_BANK_MB > automatic.
import { app } from "../../../scripts/app.js";

export const BUDGET_SETTING_ID = "QKVControl.KVBank.BudgetMB";
const MAX_BUDGET_MB = 1 << 20; // nodes/kv_bank.py MAX_BUDGET_MB (1 TiB)

app.registerExtension({
  name: "qkv_control.kv_bank_setting",
  settings: [
    {
      id: BUDGET_SETTING_ID,
      category: ["QKV Control", "Reference K/V bank", "Budget (MiB)"],
      name: "Reference K/V bank budget (MiB)",
      tooltip:
        "Memory budget of the reference K/V bank (InDetail-IP's reference, MCA-Ctrl's subject and scene " +
        "attention kept across runs), in MiB over all its entries, GPU and RAM. 0: not set (the server's " +
        "QKV_KV_BANK_MB, else a quarter of the RAM available). A QKV Reference K/V Bank node's non-zero " +
        "budget_mb overrides it for its model. Read by the server when a run starts.",
      type: "number",
      defaultValue: 0,
      attrs: { min: 0, max: MAX_BUDGET_MB, step: 64 },
    },
  ],
});
